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
    assert meta["per_source"][files[0]] == {"documents": 1, "malformed_rows": 3}
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
    with pytest.raises(ValueError, match="no usable documents.*1 malformed"):
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
