"""
Tokenizers: whatever a Hugging Face model folder ships, read so that the ids are exactly transformers', and its chat
template rendered with an assistant-token mask.

    python tokenizer.py "Hello world"                                   # the bundled Llama 3 tokenizer
    python tokenizer.py "Hello world" --tokenizer=bytes                 # the tiny models' byte-level tokenizer
    python tokenizer.py "Hello world" --tokenizer=PATH/SmolLM2-135M-Instruct --chat=True

Its own file because every script needs the model's tokenizer and none of them owns it. Two back-ends:
  - `tokenizer.json` (any Hugging Face fast tokenizer: byte-level BPE as SmolLM2 and Llama 3 HF folders ship, and
    SentencePiece-style BPE with byte fallback as Llama 2 / TinyLlama / Mistral) through Hugging Face's own
    `tokenizers` package: it is the library transformers' fast tokenizers run on, so the ids are the reference's by
    construction (re-implementing its normalisers and pre-tokenisers on tiktoken would be a second, drifting copy);
  - tiktoken for Meta's Llama 3 `tokenizer.model` (the bundled one, or a repo's `original/tokenizer.model`) and
    the byte-level tokenizer of the tiny CPU models (256 bytes + Llama 3's 256 special tokens).
A folder's own chat template (`chat_template.jinja` or the `chat_template` field of tokenizer_config.json) is
rendered with Jinja as transformers renders it; the Llama 3 tiktoken back-end keeps its hand-written Llama 3 format.

Every folder this project writes records its tokenizer (`save`): tokenizer.json & co. copied, Llama 3's
tokenizer.model under original/, or tokenizer_bytes.json for the byte-level one. `fingerprint()` identifies a
tokenizer by what it does (ids of probe strings, special ids), so two models can be checked to share one.
The bundled assets/tokenizer/llama3/tokenizer.model is Meta's, under the Llama 3 Community License (LICENSE beside
it). Built with Meta Llama 3.
"""
import hashlib
import json
import os
import shutil

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from errors import BadInput, NotFound
from folders import read_config_json, read_json, resolve_checkpoint, write_json

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
BYTES_FILE = "tokenizer_bytes.json"          # what a folder of a byte-level tiny model records
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "generation_config.json")
# probe strings for fingerprint(): words, digits, unicode, whitespace runs, code
_PROBE = ["Hello world, this is a test.", " 12345 67.89", "naïve café 🙂 日本語", "\n\n  \t x", "def f(x):\n    return x"]


class Tokenizer:
    """The interface every back-end offers:
        encode(text, bos=False, eos=False) -> ids   plain text; special-token strings in it stay plain text
        encode_with_special(text) -> ids            trusted text (templates) in which specials ARE specials
        decode(ids) -> str
        render_chat(messages, add_generation_prompt=False) -> (ids, mask)   mask 1 = an assistant token to learn
        render_chat_text(messages, add_generation_prompt=False) -> str
        bos_id, eos_id, eot_id (ends an assistant turn), pad_id, vocab_size, name, add_bos (what the model's own
        tokenizer does by default: lm-evaluation-harness follows it), fingerprint(), save(folder)
    This class is the tiktoken back-end (Llama 3 and the byte-level tokenizer); HFTokenizer reads tokenizer.json."""

    add_bos = True  # Hugging Face's Llama 3 tokenizer adds <|begin_of_text|>; the byte-level one mirrors it

    def __init__(self, name, mergeable_ranks, pattern=LLAMA3_PATTERN, path=None):
        n = len(mergeable_ranks)
        self.special = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special)
        self.name, self.path = name, path
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.eot_id = self.special["<|eot_id|>"]
        self.pad_id = self.special["<|finetune_right_pad_id|>"]
        self.start_header_id = self.special["<|start_header_id|>"]
        self.end_header_id = self.special["<|end_header_id|>"]

    # --- constructors ---
    @classmethod
    def llama3(cls, path=LLAMA3_TOKENIZER):
        """Meta's tokenizer.model (`original/tokenizer.model` in the HF repos): 128,000 ranks + 256 specials."""
        if not os.path.exists(path):
            raise NotFound(f"no Llama 3 tokenizer at {path}; pass the path of a tokenizer.model "
                           "(original/tokenizer.model of a Llama 3 HF repo)")
        with open(path, "rb") as f:
            head = f.read(64)
        if not head.split(b" ")[0].strip().isalnum() and b"=" not in head.split(b" ")[0]:
            raise BadInput(f"{path} is not a tiktoken rank file (base64 token, space, rank per line); a "
                           "SentencePiece tokenizer.model (Llama 2 and others) is read from the folder's "
                           "tokenizer.json instead")
        # expected_hash only for the bundled file: tiktoken then checks it (and its path-keyed cache can't go stale)
        ranks = load_tiktoken_bpe(path, expected_hash=LLAMA3_SHA256 if path == LLAMA3_TOKENIZER else None)
        return cls("llama3", ranks, path=path)

    @classmethod
    def byte_level(cls):
        """256 single-byte ranks (ids 0-255) + the same 256 special tokens (256-511): vocab 512."""
        return cls("llama3_bytes", {bytes([i]): i for i in range(256)})

    @classmethod
    def from_pretrained(cls, path):
        """The tokenizer a model folder (or hub id) ships: tokenizer.json (HFTokenizer), a Llama 3 tiktoken
        tokenizer.model (original/ or top level), or this project's tokenizer_bytes.json."""
        path = resolve_checkpoint(path, need_config=False)
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return HFTokenizer(path)
        for tm in (os.path.join(path, "original", "tokenizer.model"), os.path.join(path, "tokenizer.model")):
            if os.path.exists(tm):
                return cls.llama3(tm)
        if os.path.exists(os.path.join(path, BYTES_FILE)):
            return cls.byte_level()
        if os.path.exists(os.path.join(path, "tokenizer_tok512.json")):
            raise BadInput(f"{path} ships only tokenizer_tok512.json, llama2.c's id -> piece table: enough to read "
                           "its output (python model.py does), not to encode text. Fix: give a folder with a "
                           "tokenizer.json, or tokenizer=bytes / llama3 / PATH for a model trained with one")
        raise NotFound(f"{path} has no tokenizer (tokenizer.json, original/tokenizer.model or {BYTES_FILE})."
                       " Fix: copy the tokenizer files of the model it came from into it, or pass "
                       "tokenizer= (bytes, llama3, a folder or a tokenizer.model path)")

    @classmethod
    def from_name(cls, name, model_dir=None):
        """A tokenizer setting: "" = the model folder's own; "bytes"; "llama3" (bundled); a folder; a tokenizer.model."""
        if name in ("", None):
            if model_dir is None:
                raise BadInput("tokenizer='' means the model folder's own, but no model folder was given")
            return cls.from_pretrained(model_dir)
        if name == "llama3":
            return cls.llama3()
        if name in ("bytes", "llama3_bytes"):
            return cls.byte_level()
        if os.path.isdir(name):
            return cls.from_pretrained(name)
        if os.path.exists(name):
            return cls.llama3(name)
        raise BadInput(f"unknown tokenizer {name!r}: use '' (the model's own), 'llama3', 'bytes', a model folder "
                       "or the path of a tokenizer.model")

    # --- text ---
    def encode(self, text, bos=False, eos=False):
        """Plain text -> ids. Special-token strings in the text are encoded as ordinary text, never as specials."""
        ids = self.enc.encode(text, disallowed_special=())
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def encode_with_special(self, text):
        """Text in which special-token strings ARE special tokens (only for trusted strings like templates)."""
        return self.enc.encode(text, allowed_special="all")

    # --- Llama 3 chat template ---
    def render_chat(self, messages, add_generation_prompt=False):
        """[{role, content}, ...] -> (ids, mask), mask[i] = 1 where ids[i] is an assistant token to learn: the
        content of assistant messages and their closing <|eot_id|> (so the model learns to stop), never headers.
        Format: <|begin_of_text|> then per message
            <|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>
        then, with add_generation_prompt, <|start_header_id|>assistant<|end_header_id|>\\n\\n.
        Encoding piece by piece gives the same ids as encoding the whole rendered string: tiktoken splits at special
        tokens first, and the split regex never merges the "\\n\\n" after a header with the stripped content."""
        check_messages(messages)
        ids, mask = [self.bos_id], [0]

        def add(toks, learn):
            ids.extend(toks)
            mask.extend([int(learn)] * len(toks))

        for m in messages:
            learn = m["role"] == "assistant"
            add(self._header(m["role"]), False)
            add(self.encode(m["content"].strip()), learn)
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

    # --- identity and recording ---
    def fingerprint(self):
        """What the tokenizer does, hashed: ids of probe strings, vocabulary size and the special ids. Two
        tokenizers with the same fingerprint give the same ids on the probes; different ones are different."""
        if getattr(self, "_fingerprint", None) is None:  # computed once: describe() and the cache key ask often
            ids = [self.encode(p) for p in _PROBE]
            self._fingerprint = hashlib.sha256(json.dumps([ids, self.vocab_size, self.bos_id, self.eos_id,
                                                           self.eot_id]).encode()).hexdigest()[:16]
        return self._fingerprint

    def describe(self):
        return f"{self.name} ({self.vocab_size} ids, fingerprint {self.fingerprint()})"

    def save(self, folder):
        """Record this tokenizer in a model folder so that from_pretrained(folder) gives it back."""
        os.makedirs(folder, exist_ok=True)
        if self.name == "llama3_bytes":
            write_json(os.path.join(folder, BYTES_FILE), {"tokenizer": "llama3_bytes", "vocab_size": self.vocab_size,
                                                           "note": "256 byte ids + Llama 3's 256 special tokens"})
        else:
            os.makedirs(os.path.join(folder, "original"), exist_ok=True)
            shutil.copyfile(self.path, os.path.join(folder, "original", "tokenizer.model"))


def load_vocab_decoder(path):
    """A decode function for a model folder: its tokenizer, or for llama2.c models (stories260K) their
    id -> piece table tokenizer_tok512.json, which can decode but not encode."""
    table = os.path.join(path, "tokenizer_tok512.json")
    if os.path.exists(table) and not os.path.exists(os.path.join(path, "tokenizer.json")):
        with open(table) as f:
            pieces = [p for p, _ in json.load(f)["pieces"]]
        # byte-fallback pieces <0xNN> are raw bytes; U+2581 marks a space
        raw = [bytes([int(p[3:5], 16)]) if p.startswith("<0x") and len(p) == 6 else p.replace("\u2581", " ").encode()
               for p in pieces]
        return lambda ids: b"".join(raw[i] for i in ids).decode("utf-8", errors="replace")
    return Tokenizer.from_pretrained(path).decode



def check_tokenizer_for(tok, folder, role="model"):
    """Raise if `tok` has more ids than the model in `folder` embeds, or if `folder` records a tokenizer other than
    `tok` (compared by what they do, not by vocabulary size); return a note when the folder records none (nothing to
    compare with), else None. The one check every script runs before any work."""
    if os.path.exists(os.path.join(folder, "config.json")):
        n = read_config_json(folder).get("vocab_size")
        n = n if isinstance(n, int) else float("inf")  # no vocab_size: the model's own loading will complain
        if tok.vocab_size > n:
            raise BadInput(f"tokenizer {tok.describe()} has more ids than the {role}'s embedding ({n}) in "
                           f"{folder}. Fix: use the model's own tokenizer (tokenizer='')")
    try:
        own = Tokenizer.from_pretrained(folder)
    except FileNotFoundError:
        return f"the {role} {folder} records no tokenizer; assuming it was trained with {tok.name}"
    except ValueError:
        table = os.path.join(folder, "tokenizer_tok512.json")
        if not os.path.exists(table):
            raise
        decode = load_vocab_decoder(folder)
        probe = "Once upon a time, there was a little girl."
        try:
            same = decode(tok.encode(probe)).strip() == probe
        except IndexError:
            same = False
        if not same:
            raise BadInput(f"the {role} {folder} was trained with the tokenizer of its tokenizer_tok512.json, not "
                           f"with {tok.describe()}: its ids decode to other text. Fix: use the model's own "
                           "tokenizer (for llama2.c models: convert it to a tokenizer.json)") from None
        return None
    if own.fingerprint() != tok.fingerprint():
        raise BadInput(f"the {role} {folder} uses the tokenizer {own.describe()}, but this run tokenises with "
                       f"{tok.describe()}: the ids would mean different text. Fix: tokenizer='' (the model's own)")
    return None


def check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadInput(f"a conversation is a non-empty list of {{role, content}} messages, got {messages!r}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise BadInput(f"chat message needs string 'role' and 'content', got {m!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise BadInput(f"chat message with unknown role {m['role']!r} (roles: system, user, assistant): {m!r}")


# -----------------------------------------------------------------------------
# tokenizer.json through Hugging Face's `tokenizers`, with the folder's chat template


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (+ tokenizer_config.json, chat_template.jinja, config / generation_config for
    the special ids). Ids are the `tokenizers` library's: the same code transformers' fast tokenizers run."""

    def __init__(self, folder):
        from tokenizers import Tokenizer as _HF
        self.path = folder
        path = os.path.join(folder, "tokenizer.json")
        try:
            self.tk = _HF.from_file(path)
        except Exception as e:  # a tokenizer.json the library cannot read: say which file and why
            raise BadInput(f"{path}: not a tokenizer.json the `tokenizers` library can read ({e}). Fix: use the "
                           "file the model was released with (transformers' tokenizer.save_pretrained writes one)")
        # a tokenizer.json can carry its writer's truncation and padding (TransMLA's exports truncate at 512, which
        # cut 0.6% of the bundled alpaca tokens silently); transformers encodes without them unless asked, and so do we
        self.tk.no_truncation()
        self.tk.no_padding()
        # a plain-text encoder that never turns special-token strings into specials, and one that does
        self.tk_plain = _HF.from_str(self.tk.to_str())
        self.tk_plain.encode_special_tokens = True
        cfg = read_json(os.path.join(folder, "tokenizer_config.json"), missing={})
        model_cfg = read_json(os.path.join(folder, "config.json"), missing={})
        gen_cfg = read_json(os.path.join(folder, "generation_config.json"), missing={})
        self.name = os.path.basename(os.path.normpath(folder))
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.special_strings = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                self.special_strings[key] = v

        def tid(key, *fallbacks):
            s = self.special_strings.get(key)
            if s is not None and self.tk.token_to_id(s) is not None:
                return self.tk.token_to_id(s)
            for fb in fallbacks:
                if isinstance(fb, list):
                    fb = fb[0] if fb else None
                if isinstance(fb, int):
                    return fb
            return None

        self.bos_id = tid("bos_token", model_cfg.get("bos_token_id"), gen_cfg.get("bos_token_id"))
        self.eos_id = tid("eos_token", gen_cfg.get("eos_token_id"), model_cfg.get("eos_token_id"))
        self.pad_id = tid("pad_token", gen_cfg.get("pad_token_id"), model_cfg.get("pad_token_id"))
        if self.eos_id is None:
            raise BadInput(f"{folder}: no end-of-sequence token (eos_token in tokenizer_config.json or "
                           "eos_token_id in config.json / generation_config.json). Fix: add it to the folder")
        if self.pad_id is None:
            self.pad_id = self.eos_id  # padding is never a target; any id serves
        # What encode(add_special_tokens=True) adds: the post-processor of tokenizer.json, unless
        # tokenizer_config.json says otherwise (transformers then rebuilds the post-processor)
        with_sp, without = self.tk.encode("a", add_special_tokens=True).ids, self.tk.encode("a", add_special_tokens=False).ids
        self.add_bos = len(with_sp) > len(without) and with_sp[0] != without[0]
        if isinstance(cfg.get("add_bos_token"), bool):
            self.add_bos = cfg["add_bos_token"] and self.bos_id is not None
        self.template = None
        tpl = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(tpl):
            with open(tpl) as f:
                self.template = f.read()
        elif isinstance(cfg.get("chat_template"), str):
            self.template = cfg["chat_template"]
        elif isinstance(cfg.get("chat_template"), list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in cfg["chat_template"]}
            self.template = named.get("default")
        self._compiled = None
        self._eot = None

    def encode(self, text, bos=False, eos=False):
        ids = self.tk_plain.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is None:
            raise BadInput(f"{self.path}: this tokenizer has no BOS token")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_with_special(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tk.decode(list(ids), skip_special_tokens=False)

    @property
    def eot_id(self):
        """The token that ends an assistant turn in the chat template (<|im_end|>, <|eot_id|>, </s>, ...)."""
        if self._eot is None:
            probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            text, spans = self._render_spans(probe)
            s, e = spans[0]
            enc = self.tk.encode(text, add_special_tokens=False)
            after = [i for i, (a, b) in zip(enc.ids, enc.offsets) if a >= e]
            specials = {self.tk.token_to_id(t.content) for t in self.tk.get_added_tokens_decoder().values()
                        if t.special} if hasattr(self.tk, "get_added_tokens_decoder") else set()
            self._eot = next((i for i in after if i in specials), after[0] if after else self.eos_id)
        return self._eot

    # --- the chat template, rendered as transformers renders it ---
    def _env_template(self):
        if self._compiled is None:
            if self.template is None:
                raise BadInput(f"{self.path} has no chat template (chat_template.jinja or the chat_template field "
                               "of tokenizer_config.json); chat data needs one. Fix: add the template of the "
                               "model's instruct version, or train on plain text")
            import jinja2
            from jinja2.ext import Extension, loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            class Generation(Extension):  # {% generation %}...{% endgeneration %}: rendered as is
                tags = {"generation"}

                def parse(self, parser):
                    lineno = next(parser.stream).lineno
                    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

                def _render(self, caller):
                    return caller()

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            def strftime_now(fmt):
                import datetime
                return datetime.datetime.now().strftime(fmt)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = strftime_now
            try:
                self._compiled = env.from_string(self.template)
            except jinja2.exceptions.TemplateError as e:
                raise BadInput(f"{self.path}: the chat template does not parse ({e})") from None
        return self._compiled

    def render_chat_text(self, messages, add_generation_prompt=False):
        """The folder's chat template rendered as transformers' apply_chat_template(tokenize=False) does."""
        import jinja2
        check_messages(messages)
        try:
            return self._env_template().render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                               tools=None, documents=None, **self.special_strings)
        except jinja2.exceptions.TemplateError as e:
            raise BadInput(f"{self.path}: the chat template failed on this conversation ({e}); "
                           f"conversation: {messages!r}") from None

    def _render_spans(self, messages, add_generation_prompt=False):
        """The rendered text and, per assistant message, the character span of its content up to the end of its
        turn: the text that rendering messages[:i + 1] adds after rendering messages[:i] with a generation prompt.
        Works for any template whose renderings of prefixes of a conversation are prefixes of each other."""
        text = self.render_chat_text(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render_chat_text(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render_chat_text(messages[:i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise BadInput(f"{self.path}: the chat template renders a conversation's prefix differently from "
                               "the conversation (e.g. it treats the last turn specially), so the assistant tokens "
                               "cannot be located. Fix: train with loss_on='all', or use a prefix-stable template")
            spans.append((len(before), len(upto)))
        return text, spans

    def render_chat(self, messages, add_generation_prompt=False):
        """-> (ids, mask): the template's text tokenised as transformers' apply_chat_template(tokenize=True) does
        (special-token strings of the template are specials), mask 1 on the assistant content and the special
        token that ends its turn; headers, other roles and what follows the end-of-turn token are 0."""
        text, spans = self._render_spans(messages, add_generation_prompt)
        enc = self.tk.encode(text, add_special_tokens=False)
        ids, mask = list(enc.ids), [0] * len(enc.ids)
        eot = self.eot_id if spans else None
        for s, e in spans:
            inside = [j for j, (a, b) in enumerate(enc.offsets) if b > s and a < e]  # tokens touching the turn
            if not inside:
                continue
            # learn up to and including the end-of-turn token, not the newline the template puts after it
            stop = next((j for j in inside if ids[j] == eot), inside[-1])
            for j in inside:
                mask[j] = int(j <= stop)
        return ids, mask

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        for name in HF_FILES:
            src = os.path.join(self.path, name)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(folder, name)):
                shutil.copyfile(src, os.path.join(folder, name))


if __name__ == "__main__":
    from configurator import configure
    text = "This is a test sentence."   # the text to encode
    tokenizer = "llama3"      # "llama3", "bytes", a model folder or a tokenizer.model path
    chat = False              # render text as one user message with the tokenizer's chat template
    configure(globals(), positional=("text",))  # python tokenizer.py "some text": a bare argument is the text
    tok = Tokenizer.from_name(tokenizer)
    if chat:
        ids, mask = tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        print(repr(tok.render_chat_text([{"role": "user", "content": text}], add_generation_prompt=True)))
    else:
        ids = tok.encode(text)
    print(ids)
    print(repr(tok.decode(ids)))
    print(tok.describe())
