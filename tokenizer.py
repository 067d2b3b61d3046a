"""
Tokenizers on tiktoken: the Llama 3 tokenizer (from Meta's tokenizer.model), a byte-level tokenizer with the same
special tokens for tiny CPU models, and the Llama 3 chat template with an assistant-token mask, shared by both.

    python tokenizer.py "Hello world"            # Llama 3 ids
    python tokenizer.py --byte "Hello world"     # byte-level ids

Its own file because distill.py, dpo.py and evaluate.py all need it and none of them owns it.
The bundled assets/tokenizer/llama3/tokenizer.model is Meta's, under the Llama 3 Community License (LICENSE beside
it). Built with Meta Llama 3.
"""
import os
import sys

import tiktoken
from tiktoken.load import load_tiktoken_bpe

LLAMA3_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer", "llama3",
                                "tokenizer.model")
LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
# The split regex of Llama 3 (meta-llama/llama-models, llama3/tokenizer.py)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The 256 special tokens of Llama 3.1+ in id order after the ordinary ranks (128000.. for Llama 3)
_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIAL_TOKENS = _NAMED + [f"<|reserved_special_token_{3 + i}|>" for i in range(256 - len(_NAMED))]


class Tokenizer:
    def __init__(self, name, mergeable_ranks, pattern=LLAMA3_PATTERN):
        n = len(mergeable_ranks)
        self.special = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special)
        self.name = name
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.eot_id = self.special["<|eot_id|>"]
        self.pad_id = self.special["<|finetune_right_pad_id|>"]
        self.start_header_id = self.special["<|start_header_id|>"]
        self.end_header_id = self.special["<|end_header_id|>"]

    @classmethod
    def llama3(cls, path=LLAMA3_TOKENIZER):
        """Meta's tokenizer.model (`original/tokenizer.model` in the HF repos): 128,000 ranks + 256 specials."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no Llama 3 tokenizer at {path}; pass the path of a tokenizer.model "
                                    "(original/tokenizer.model of a Llama 3 HF repo)")
        # expected_hash only for the bundled file: tiktoken then checks it (and its path-keyed cache can't go stale)
        ranks = load_tiktoken_bpe(path, expected_hash=LLAMA3_SHA256 if path == LLAMA3_TOKENIZER else None)
        return cls("llama3", ranks)

    @classmethod
    def byte_level(cls):
        """256 single-byte ranks (ids 0-255) + the same 256 special tokens (256-511): vocab 512."""
        return cls("llama3_bytes", {bytes([i]): i for i in range(256)})

    @classmethod
    def from_name(cls, name):
        if name == "llama3":
            return cls.llama3()
        if name in ("bytes", "llama3_bytes"):
            return cls.byte_level()
        if os.path.exists(name):
            return cls.llama3(name)
        raise ValueError(f"unknown tokenizer {name!r}: use 'llama3', 'bytes' or a path to a tokenizer.model")

    def encode(self, text, bos=False, eos=False):
        """Plain text -> ids. Special-token strings in the text are encoded as ordinary text, never as specials."""
        ids = self.enc.encode(text, disallowed_special=())
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return self.enc.decode(list(ids))

    # --- Llama 3 chat template ---
    def render_chat(self, messages, add_generation_prompt=False):
        """[{role, content}, ...] -> (ids, mask), mask[i] = 1 where ids[i] is an assistant token to learn: the
        content of assistant messages and their closing <|eot_id|> (so the model learns to stop), never headers.
        Format: <|begin_of_text|> then per message
            <|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>
        then, with add_generation_prompt, <|start_header_id|>assistant<|end_header_id|>\\n\\n.
        Encoding piece by piece gives the same ids as encoding the whole rendered string: tiktoken splits at special
        tokens first, and the split regex never merges the "\\n\\n" after a header with the stripped content."""
        ids, mask = [self.bos_id], [0]

        def add(toks, learn):
            ids.extend(toks)
            mask.extend([int(learn)] * len(toks))

        for m in messages:
            role, content = m["role"], m["content"]
            if not isinstance(content, str) or not isinstance(role, str):
                raise ValueError(f"chat message needs string 'role' and 'content', got {m!r}")
            learn = role == "assistant"
            add(self._header(role), False)
            add(self.encode(content.strip()), learn)
            add([self.eot_id], learn)
        if add_generation_prompt:
            add(self._header("assistant"), False)
        return ids, mask

    def _header(self, role):
        return [self.start_header_id] + self.encode(role) + [self.end_header_id] + self.encode("\n\n")

    def render_chat_text(self, messages, add_generation_prompt=False):
        """The same template as a string (for reading and for checking against the ids)."""
        s = "<|begin_of_text|>" + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages)
        return s + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")

    def encode_with_special(self, text):
        """Text in which special-token strings ARE special tokens (only for trusted strings like templates)."""
        return self.enc.encode(text, allowed_special="all")


if __name__ == "__main__":
    args = sys.argv[1:]
    tok = Tokenizer.byte_level() if "--byte" in args else Tokenizer.llama3()
    text = " ".join(a for a in args if a != "--byte") or "This is a test sentence."
    ids = tok.encode(text)
    print(ids)
    print(repr(tok.decode(ids)))
