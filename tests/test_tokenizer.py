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
