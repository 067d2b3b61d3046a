"""data.py: row shapes -> chat documents, malformed rows counted, the token cache, packing with BOS/EOS, masks,
deterministic per-rank batches."""
import json
import os

import numpy as np
import pytest

from data import PackedData, build_cache, iter_rows, to_documents
from tokenizer import Tokenizer

ROWS = {
    "messages.jsonl": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello."}]},
                       {"messages": [{"role": "user", "content": "no reply"}]},                    # malformed
                       {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}],
    "sharegpt.json": [{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                                         {"from": "human", "value": "and 3+3?"}, {"from": "gpt", "value": "6"}]},
                      {"conversations": [{"from": "gpt", "value": 7}]}],                            # malformed
    "alpaca.json": [{"instruction": "Add.", "input": "1 and 2", "output": "3"},
                    {"instruction": "Greet.", "input": "", "output": "Hi!"},
                    {"instruction": "Nothing", "input": "", "output": None}],                       # malformed
}


@pytest.fixture
def files(tmp_path):
    paths = []
    for name, rows in ROWS.items():
        p = tmp_path / name
        if name.endswith(".jsonl"):
            p.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")               # one broken line
        else:
            p.write_text(json.dumps(rows))
        paths.append(str(p))
    return paths


def test_row_shapes():
    assert to_documents(ROWS["alpaca.json"][0]) == [[{"role": "user", "content": "Add.\n\n1 and 2"},
                                                     {"role": "assistant", "content": "3"}]]
    assert to_documents(ROWS["sharegpt.json"][0])[0][3] == {"role": "assistant", "content": "6"}
    assert to_documents({"instruction": "Fix.", "instances": [{"input": "a", "output": "A"},
                                                             {"input": "b", "output": "B"}]})[1][1]["content"] == "B"
    assert to_documents({"prompt": "Q", "response": "R"})[0][1] == {"role": "assistant", "content": "R"}
    assert to_documents({"text": "plain words"}) == ["plain words"]
    for bad in (None, "x", {}, {"text": "  "}, ROWS["messages.jsonl"][1], ROWS["messages.jsonl"][2],
                ROWS["sharegpt.json"][1], ROWS["alpaca.json"][2], {"messages": "not a list"}):
        assert to_documents(bad) == []


def test_cache_packing_and_masks(files, tmp_path):
    logs = []
    cache = build_cache(files, "bytes", str(tmp_path / "cache"), val_every=1000, log=logs.append)
    meta = json.load(open(os.path.join(cache, "meta.json")))
    assert meta["documents"] == 4 and meta["malformed_rows"] == 5   # incl. the broken JSON line
    assert {k: meta["per_source"][files[0]][k] for k in ("documents", "malformed_rows")} == \
        {"documents": 1, "malformed_rows": 3}
    tok = Tokenizer.byte_level()
    ids = np.fromfile(os.path.join(cache, "train.bin"), dtype=np.uint16)
    mask = np.fromfile(os.path.join(cache, "train_mask.bin"), dtype=np.uint8)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert (ids == tok.bos_id).sum() == 4 and (ids == tok.eos_id).sum() == 4     # one BOS per doc, EOS after each
    assert list(ids[np.flatnonzero(ids == tok.eos_id)[:-1] + 1]) == [tok.bos_id] * 3  # EOS then the next BOS
    first_doc = ids[: np.flatnonzero(ids == tok.eos_id)[0]]
    assert tok.decode(first_doc[mask[: len(first_doc)] == 1]) == "Hello.<|eot_id|>"
    # the cache is reused, not rebuilt
    assert build_cache(files, "bytes", str(tmp_path / "cache"), val_every=1000, log=logs.append) == cache
    # assistant-only targets
    T = 16
    for loss_on in ("all", "assistant"):
        d = PackedData(cache, "train", T, loss_on)
        x, y = d.get(range(d.n_seq))
        assert x.shape == y.shape == (d.n_seq, T)
        if loss_on == "all":
            assert (x[0, 1:] == y[0, :-1]).all() and x[1, 0] == y[0, -1]            # shifted, contiguous
            assert (y != -100).all()
        else:
            m = mask[1:d.n_seq * T + 1].reshape(d.n_seq, T)
            assert ((y == -100).numpy() == (m == 0)).all() and (y != -100).any()


def test_batches_are_deterministic_and_split_across_ranks(files, tmp_path):
    cache = build_cache(files, "bytes", str(tmp_path / "c"), val_every=1000, log=lambda *a: None)
    d = PackedData(cache, "train", 8, "all")
    one = [i for m in range(4) for i in d.batch_indices(3, m, 0, 1, 2, 4, seed=7)]
    two = [i for m in range(2) for r in range(2) for i in d.batch_indices(3, m, r, 2, 2, 2, seed=7)]
    assert sorted(one) == sorted(two) and len(set(one)) == 8                          # same sequences per step
    assert one == [i for m in range(4) for i in d.batch_indices(3, m, 0, 1, 2, 4, seed=7)]
    assert one != [i for m in range(4) for i in d.batch_indices(3, m, 0, 1, 2, 4, seed=8)]
    epoch0 = [i for s in range(d.n_seq) for i in d.batch_indices(s, 0, 0, 1, 1, 1, seed=7)]
    assert sorted(epoch0) == list(range(d.n_seq))                                    # an epoch visits each once


def test_empty_and_missing_sources(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(ValueError, match="no usable documents.*1 skipped; first: .*bad.jsonl:1: none of the fields"):
        build_cache([str(p)], "bytes", str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="neither a file"):
        list(iter_rows("no_such_file.json"))
    with pytest.raises(Exception):                                                   # a hub id, offline: fails fast
        list(iter_rows("some-org/some-set@train"))


def test_bundled_sets_parse():
    root = os.path.join(os.path.dirname(__file__), "..", "assets", "data", "sft")
    for name, n in (("alpaca_en_demo.json", 999), ("fastchat_dummy_conversation.json", 500),
                    ("self_instruct_user_oriented.jsonl", 252)):
        docs = [doc for row in iter_rows(os.path.join(root, name)) for doc in to_documents(row)]
        assert len(docs) >= n


def test_bad_bytes_are_malformed_rows_named_by_file_and_line(tmp_path):
    good = json.dumps({"instruction": "Hi", "input": "", "output": "Hello."}).encode()
    (tmp_path / "a.jsonl").write_bytes(good + b"\n" + good[:20] + b"\xff\xfe" + good[20:] + b"\n" + good + b"\n")
    (tmp_path / "b.txt").write_bytes(b"A fine line.\nA bad \xc3\x28 line.\nAnother fine line.\n")
    rows = [{"instruction": "Hi", "input": "", "output": "Hello."}, {"instruction": "Bad \udcff", "input": "",
                                                                     "output": "x"}]
    (tmp_path / "c.json").write_bytes(json.dumps(rows, ensure_ascii=False).encode("utf-8", "surrogateescape"))
    logs = []
    cache = build_cache([str(tmp_path / n) for n in ("a.jsonl", "b.txt", "c.json")], "bytes",
                        str(tmp_path / "cache"), log=logs.append)
    meta = json.load(open(os.path.join(cache, "meta.json")))
    per = meta["per_source"]
    assert per[str(tmp_path / "a.jsonl")]["documents"] == 2 and per[str(tmp_path / "a.jsonl")]["malformed_rows"] == 1
    assert per[str(tmp_path / "a.jsonl")]["malformed_first"][0].startswith(f"{tmp_path / 'a.jsonl'}:2: invalid UTF-8")
    assert per[str(tmp_path / "b.txt")]["malformed_rows"] == 1 and per[str(tmp_path / "b.txt")]["documents"] == 1
    assert per[str(tmp_path / "c.json")] ["documents"] == 1 and per[str(tmp_path / "c.json")]["malformed_rows"] == 1
    assert any("a.jsonl:2" in line for line in logs)


def test_json_shapes(tmp_path):
    row = {"instruction": "Hi", "input": "", "output": "Hello."}
    (tmp_path / "one.json").write_text(json.dumps(row))                         # a single row, not a list
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": [row, row]}))
    assert len(list(iter_rows(str(tmp_path / "one.json")))) == 1
    assert len(list(iter_rows(str(tmp_path / "wrapped.json")))) == 2
    (tmp_path / "broken.json").write_text('[{"a": 1},\n {"b": }]')
    with pytest.raises(ValueError, match="broken.json:2: not valid JSON"):
        list(iter_rows(str(tmp_path / "broken.json")))


class CountingStr(str):
    """A str that counts the characters its slices copy."""
    copied = 0

    def __getitem__(self, k):
        out = str.__getitem__(self, k)
        if isinstance(k, slice):
            CountingStr.copied += len(out)
        return out


def test_long_lines_are_cut_in_linear_time():
    from data import _cut_line, _text_documents
    for n in (100_000, 1_000_000):
        CountingStr.copied = 0
        line = CountingStr("word " * (n // 5))                                  # one line, no sentence ends
        pieces = _cut_line(line, 4000)
        assert "".join(pieces).replace(" ", "") == str(line).replace(" ", "")  # nothing lost
        assert all(len(p) <= 4000 for p in pieces)
        assert CountingStr.copied <= 2 * n                                      # linear: each char copied ~once
    assert _cut_line("One. Two. Three.", 6) == ["One.", "Two.", "Three."]
    docs = _text_documents("x" * 10_000 + "\n\nshort")
    assert sum(len(d) for d in docs) >= 10_000
