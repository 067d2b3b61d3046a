"""tokenizer.py: Llama 3 ids as published, special tokens, the chat template and its assistant mask."""
import pytest

from tokenizer import SPECIAL_TOKENS, Tokenizer

MSGS = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2?\n"},
        {"role": "assistant", "content": "4.\n\nAnything else?"},
        {"role": "user", "content": "No."}]


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.llama3()


def test_llama3_known_ids(llama3):
    assert llama3.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]
    assert llama3.encode("user") == [882] and llama3.encode("system") == [9125] and llama3.encode("\n\n") == [271]
    assert llama3.vocab_size == 128256 and len(SPECIAL_TOKENS) == 256
    assert (llama3.bos_id, llama3.eos_id, llama3.start_header_id, llama3.end_header_id, llama3.eot_id) == \
        (128000, 128001, 128006, 128007, 128009)
    assert llama3.special["<|finetune_right_pad_id|>"] == 128004
    assert llama3.special["<|eom_id|>"] == 128008 and llama3.special["<|python_tag|>"] == 128010
    assert llama3.special["<|reserved_special_token_247|>"] == 128255


def test_round_trip_and_specials_as_text(llama3):
    text = "Héllo wörld 🙂 <|eot_id|> 12345"
    ids = llama3.encode(text, bos=True, eos=True)
    assert ids[0] == 128000 and ids[-1] == 128001
    assert 128009 not in ids                      # a special-token string in user text is plain text
    assert llama3.decode(ids[1:-1]) == text


@pytest.mark.parametrize("name", ["llama3", "bytes"])
def test_chat_template(name, llama3):
    tok = llama3 if name == "llama3" else Tokenizer.byte_level()
    ids, mask = tok.render_chat(MSGS, add_generation_prompt=True)
    text = tok.render_chat_text(MSGS, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n4.\n\nAnything else?<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nNo.<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids == tok.encode_with_special(text)   # piecewise encoding == encoding the whole string
    assert tok.decode(ids) == text
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned) == "4.\n\nAnything else?<|eot_id|>"   # only the assistant reply and its eot
    assert len(mask) == len(ids)


def test_byte_level():
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 512 and tok.bos_id == 256 and tok.eot_id == 265
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    assert tok.decode(tok.encode("hé")) == "hé"


def test_bad_messages_and_names(llama3, tmp_path):
    with pytest.raises(ValueError, match="string 'role' and 'content'"):
        llama3.render_chat([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="unknown tokenizer"):
        Tokenizer.from_name("gpt5")
    with pytest.raises(FileNotFoundError, match="no Llama 3 tokenizer"):
        Tokenizer.llama3(str(tmp_path / "missing.model"))


# --- Hugging Face tokenizer.json folders: ids and chat rendering exactly transformers' (test-only reference)

import json  # noqa: E402
import os  # noqa: E402

from conftest import FIXTURES  # noqa: E402

TOK_FIXTURES = os.path.join(FIXTURES, "tokenizers")
HF_KINDS = ["bytebpe", "bytebpe_llama3", "spbpe"]
TEXTS = ["Hello world", "  leading and  double  spaces\t\ttabs\n\nnewlines\r\n", "naïve café 🙂 日本語 Ünïcödé",
         "digits 1234567890 3.14159 -42", "<|im_end|> and <s> in plain text </s> <|eot_id|>", " ", "a\u00a0b",
         "ROMEO: What say'st thou? I'll've it", "x" * 50, "\n\n\n", "tab\tend "]


@pytest.fixture(scope="module", params=HF_KINDS)
def pair(request):
    transformers = pytest.importorskip("transformers")
    path = os.path.join(TOK_FIXTURES, request.param)
    return (request.param, Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path),
            transformers.AutoTokenizer.from_pretrained(path, split_special_tokens=True))


def test_ids_equal_transformers(pair):
    name, ours, hf, hf_plain = pair
    n = 0
    for t in TEXTS:
        assert ours.encode(t) == hf_plain.encode(t, add_special_tokens=False), (name, t)   # specials stay text
        assert ours.encode_with_special(t) == hf.encode(t, add_special_tokens=False), (name, t)
        assert ours.encode(t, bos=ours.add_bos) == hf_plain.encode(t), (name, t)         # BOS as the model adds it
        assert ours.decode(ours.encode(t)) == hf_plain.decode(hf_plain.encode(t, add_special_tokens=False))
        n += 1
    assert n == len(TEXTS) and ours.vocab_size == len(hf)
    assert ours.add_bos == (name != "bytebpe")      # ChatML/SmolLM2 style adds no BOS; Llama 2 and Llama 3 do


def test_a_tokenizer_json_that_truncates_or_pads_encodes_whole_texts(tmp_path):
    """A tokenizer.json saved with truncation and padding on (TransMLA's exports: 512 tokens) encodes every token,
    as transformers does by default; the file as written would cut the text (the test can fail)."""
    import shutil

    from tokenizers import Tokenizer as HF
    src = os.path.join(TOK_FIXTURES, "bytebpe")
    shutil.copytree(src, tmp_path / "tok")
    path = tmp_path / "tok" / "tokenizer.json"
    spec = json.loads(path.read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<unk>"}
    path.write_text(json.dumps(spec))
    text = " ".join(TEXTS)
    whole = Tokenizer.from_pretrained(src).encode(text)
    assert len(whole) > 8
    assert Tokenizer.from_pretrained(str(tmp_path / "tok")).encode(text) == whole
    assert len(HF.from_file(str(path)).encode(text, add_special_tokens=False).ids) == 64  # the file truncates + pads


CONVS = [MSGS, MSGS[1:], MSGS[1:3], [{"role": "user", "content": "Hi"}]]


def test_chat_rendering_equals_apply_chat_template(pair):
    name, ours, hf, _ = pair
    for conv in CONVS:
        for gp in (False, True):
            text = ours.render_chat_text(conv, gp)
            assert text == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gp), (name, conv, gp)
            ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gp)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert ours.render_chat(conv, gp)[0] == list(ids), (name, conv, gp)


@pytest.mark.parametrize("name,eot,learned", [
    ("bytebpe", "<|im_end|>", ["4.\n\nAnything else?<|im_end|>"]),
    ("bytebpe_llama3", "<|eot_id|>", ["4.\n\nAnything else?<|eot_id|>"]),
    ("spbpe", "</s>", ["4.\n\nAnything else?</s>"]),
])
def test_assistant_mask_by_hand(name, eot, learned):
    tok = Tokenizer.from_pretrained(os.path.join(TOK_FIXTURES, name))
    assert tok.decode([tok.eot_id]) == eot
    conv = MSGS + [{"role": "assistant", "content": "Bye."}]
    ids, mask = tok.render_chat(conv)
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    runs += [tok.decode(cur)] if cur else []
    assert runs[0] == learned[0] and runs[1].endswith("Bye." + eot) and len(runs) == 2
    assert len(mask) == len(ids)


def test_llama3_folder_and_bytes_folder_round_trip(tmp_path):
    Tokenizer.llama3().save(tmp_path / "l3")
    Tokenizer.byte_level().save(tmp_path / "b")
    assert Tokenizer.from_pretrained(tmp_path / "l3").fingerprint() == Tokenizer.llama3().fingerprint()
    assert Tokenizer.from_pretrained(tmp_path / "b").name == "llama3_bytes"
    hf = Tokenizer.from_pretrained(os.path.join(TOK_FIXTURES, "bytebpe"))
    hf.save(tmp_path / "h")
    again = Tokenizer.from_pretrained(tmp_path / "h")
    assert again.fingerprint() == hf.fingerprint() and again.render_chat(MSGS) == hf.render_chat(MSGS)
    assert hf.fingerprint() != Tokenizer.from_pretrained(os.path.join(TOK_FIXTURES, "bytebpe_llama3")).fingerprint()


def test_bad_tokenizer_folders_and_conversations(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.*Fix"):
        Tokenizer.from_pretrained(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Quantum"}}))
    with pytest.raises(ValueError, match="odd/tokenizer.json: not a tokenizer.json the `tokenizers` library can read"):
        Tokenizer.from_pretrained(tmp_path / "odd")
    (tmp_path / "raises").mkdir()
    src = os.path.join(TOK_FIXTURES, "bytebpe")
    (tmp_path / "raises" / "tokenizer.json").write_text(open(os.path.join(src, "tokenizer.json")).read())
    cfg = json.load(open(os.path.join(src, "tokenizer_config.json")))
    cfg["chat_template"] = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    (tmp_path / "raises" / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_pretrained(tmp_path / "raises")
    with pytest.raises(ValueError, match="the chat template failed on this conversation \\(no system role\\)"):
        tok.render_chat(MSGS)
    with pytest.raises(ValueError, match="unknown role 'wizard'"):
        tok.render_chat([{"role": "wizard", "content": "x"}])
    del cfg["chat_template"]
    (tmp_path / "raises" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no chat template"):
        Tokenizer.from_pretrained(tmp_path / "raises").render_chat(MSGS)
