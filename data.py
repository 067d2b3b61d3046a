"""
Training data, nanoGPT-style: rows from Hugging Face `datasets` ids or local files are normalised to chat messages
(or plain text), rendered with the model's own chat template (tokenizer.py), tokenised ONCE into memory-mapped token files, and served
as packed fixed-length sequences, each rank its own slice of a deterministic shuffle.

    python data.py assets/data/sft/alpaca_en_demo.json --tokenizer=bytes     # build the cache, print statistics
    python data.py assets/data/sft/alpaca_en_demo.json --tokenizer=PATH/SmolLM2-135M-Instruct   # its template

Its own file because distill.py (the SFT mix, and the tiny teacher's pre-training) and dpo.py (preference pairs) read
through it.

Row shapes understood (anything else is counted as malformed and skipped, never a crash):
    {"messages": [{"role", "content"}, ...]}                      OpenAI / HF chat (sftdatasetv3, GenQA, ...)
    {"conversations": [{"from": "human"|"gpt"|"system", "value"}]} ShareGPT (OpenHermes-2.5, Infinity-Instruct)
    {"instruction", "input", "output"}                            Alpaca
    {"instruction", "instances": [{"input", "output"}, ...]}      self-instruct (one conversation per instance)
    {"prompt", "response" | "completion"}                         prompt/response pairs
    {"text": "..."}  and .txt files                               plain text (pre-training)
Packing: every document starts as the model's template starts it (Llama 3: <|begin_of_text|>; plain text gets
BOS where the tokenizer adds one) and is followed by EOS; documents are concatenated and cut into sequences of
seq_len + 1 tokens (inputs, shifted targets).
Attention is not masked at document boundaries (the student and its teacher see the same packed context, so the
KL target is still exact; the cost is some attention across unrelated documents).
"""
import functools
import gzip
import hashlib
import json
import os
import re
import time

import numpy as np
import torch

from errors import BadInput, NotFound
from tokenizer import Tokenizer

# The paper's SFT mix on the hub: name -> (dataset id, config, splits)
HUB_SETS = {
    "openhermes": ("teknium/OpenHermes-2.5", None, ["train"]),
    "genqa": ("tomg-group-umd/GenQA", None, ["academic", "code", "dialog", "general", "math", "mmlu",
                                             "multiple_choice", "task", "writing"]),
    "infinity_instruct": ("BAAI/Infinity-Instruct", "7M", ["train"]),
    "sftdatasetv3": ("JunxiongWang/sftdatasetv3", None, ["train"]),  # the three above, prepared by MambaInLlama
    # preference pairs for DPO (the paper's three sets)
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", None, ["train_prefs"]),
    "ultrafeedback_test": ("HuggingFaceH4/ultrafeedback_binarized", None, ["test_prefs"]),
    "orca_dpo_pairs": ("HuggingFaceH4/orca_dpo_pairs", None, ["train_prefs"]),
    "llama3_ultrafeedback_armorm": ("JunxiongWang/llama3-ultrafeedback-armorm", None, ["train"]),
}
# the bundled SFT mix (assets/data/PROVENANCE.md): the default training and calibration text of every script
BUNDLED_SFT = ("assets/data/sft/alpaca_en_demo.json", "assets/data/sft/self_instruct_user_oriented.jsonl",
               "assets/data/sft/fastchat_dummy_conversation.json")
CACHE_VERSION = 4  # bump when tokenisation or packing changes: old caches are then rebuilt, never reused
# (4: a tokenizer.json's own truncation is no longer applied; a cache built under it may hold cut documents)
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system"}


# -----------------------------------------------------------------------------
# Reading rows


def iter_rows(source):
    """Rows of a source: a local .json / .jsonl(.gz) / .txt / .parquet file, a HUB_SETS name, or a hub id written
    "org/name[:config][@split]" (all splits of HUB_SETS entries; "train" for bare ids)."""
    for _, row in located_rows(source):
        yield row


def located_rows(source):
    """(where, row) for every row of a source: where is "file:line", "file: row i" or "hub_id[split] row i", so a
    skipped row can be named."""
    if os.path.exists(source):
        yield from _iter_file(source)
        return
    import datasets
    if source in HUB_SETS:
        hub_id, config, splits = HUB_SETS[source]
    else:
        if source.count("/") != 1 and ":" not in source and "@" not in source:
            raise NotFound(f"data source {source!r} is neither a file, a known set "
                           f"({', '.join(HUB_SETS)}) nor a hub id 'org/name[:config][@split]'")
        hub_id, _, split = source.partition("@")
        hub_id, _, config = hub_id.partition(":")
        config, splits = config or None, [split or "train"]
    for split in splits:
        for i, row in enumerate(datasets.load_dataset(hub_id, config, split=split)):
            yield f"{hub_id}[{split}] row {i}", row


class Malformed:
    """A row that could not be read (invalid UTF-8, broken JSON): counted and named (file:line), never a crash."""

    def __init__(self, where, why):
        self.where, self.why = where, why


def check_sources(sources):
    """Fail before any work on a data source that is neither a file nor a hub name/id."""
    if isinstance(sources, str):
        raise BadInput(f"data sources are a list of paths or hub ids, got the string {sources!r}; write [{sources!r}]")
    for src in sources:
        if not os.path.exists(src) and src not in HUB_SETS and src.count("/") != 1 and ":" not in src and "@" not in src:
            raise NotFound(f"data source {src!r} is neither a file, a known set ({', '.join(HUB_SETS)}) "
                           "nor a hub id 'org/name[:config][@split]'")
        if not os.path.exists(src) and src.count("/") == 1 and os.path.isdir(src.split("/")[0]):
            raise NotFound(f"data source {src!r} does not exist ({src.split('/')[0]}/ is a local folder, so "
                           "it is not a hub id)")
        base = src[:-3] if src.endswith(".gz") else src
        if not os.path.exists(src) and base.endswith((".json", ".jsonl", ".txt", ".parquet")):
            raise NotFound(f"data file {src!r} not found")
        if os.path.exists(src) and not base.endswith((".json", ".jsonl", ".txt", ".parquet")):
            raise BadInput(f"{src}: unknown file type (use .json, .jsonl, .txt, .parquet, optionally .gz)")


def _iter_file(path):
    opener = gzip.open if path.endswith(".gz") else open
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".txt"):
        with opener(path, "rb") as f:
            good = []
            for n, raw in enumerate(f, 1):
                try:
                    good.append(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield f"{path}:{n}", Malformed(f"{path}:{n}", f"invalid UTF-8 ({e.reason} at byte {e.start})")
        yield from ((f"{path}: document {i}", {"text": t}) for i, t in enumerate(_text_documents("".join(good))))
    elif base.endswith(".jsonl"):
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                where = f"{path}:{n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, Malformed(where, f"invalid UTF-8 ({e.reason} at byte {e.start})")
                    continue
                if line.strip():
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield where, Malformed(where, f"broken JSON ({e.msg})")
    elif base.endswith(".json"):
        with opener(path, "rb") as f:
            raw = f.read()
        # bad bytes become lone surrogates, so the rows holding them can be found and skipped
        try:
            text, bad_bytes = raw.decode("utf-8"), False
        except UnicodeDecodeError:
            text, bad_bytes = raw.decode("utf-8", errors="surrogateescape"), True
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json source is one JSON list of rows "
                           "(use .jsonl for one row per line, where a broken line is skipped)") from None
        if isinstance(obj, dict):  # {"data": [...]} style, or a single row
            lists = [v for v in obj.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            obj = lists[0] if len(lists) == 1 else [obj]
        if not isinstance(obj, list):
            raise BadInput(f"{path}: a .json source must hold a list of rows (or an object with one list of rows), "
                           f"got a {type(obj).__name__}")
        for i, row in enumerate(obj):
            where = f"{path}: row {i}"
            yield where, (Malformed(where, "invalid UTF-8") if bad_bytes and _has_surrogates(row) else row)
    elif base.endswith(".parquet"):
        import datasets
        for i, row in enumerate(datasets.load_dataset("parquet", data_files=path, split="train")):
            yield f"{path}: row {i}", row
    else:
        raise BadInput(f"{path}: unknown file type (use .json, .jsonl, .txt, .parquet, optionally .gz)")


def _cut_line(line, max_chars):
    """A line longer than max_chars cut at sentence ends ('. '), else at max_chars. Each piece is sliced once from
    the original, so the work is linear in the line's length (re-slicing the remainder made it quadratic)."""
    if len(line) <= max_chars:
        return [line]
    pieces, start = [], 0
    while len(line) - start > max_chars:
        cut = line.rfind(". ", start, start + max_chars) + 1 or start + max_chars
        pieces.append(line[start:cut])
        start = cut
        while start < len(line) and line[start].isspace():
            start += 1
    pieces.append(line[start:])
    return pieces


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogates(x):
    """A lone surrogate anywhere in a row: an invalid UTF-8 byte escaped by the reader, or a "\\ud800" written into
    the JSON. Not Unicode text: tokenizers refuse it (Hugging Face's with a TypeError)."""
    if isinstance(x, str):
        return _SURROGATE.search(x) is not None
    if isinstance(x, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in x.items())
    if isinstance(x, list):
        return any(_has_surrogates(v) for v in x)
    return False


def _text_documents(text, max_chars=4000):
    """A long plain text cut into documents of at most ~max_chars, at line breaks (a blank line ends a document
    once it holds half of max_chars, so paragraphs stay whole where the text has them). Linear in the text's size:
    a line longer than max_chars (a whole article on one line) is cut at sentence ends by index, never re-sliced."""
    docs, cur = [], []
    size = 0
    lines = []
    for line in text.split("\n"):
        lines.extend(_cut_line(line, max_chars))
    for line in lines:
        if cur and (size + len(line) > max_chars or (not line.strip() and size > max_chars // 2)):
            docs.append("\n".join(cur).strip())
            cur, size = [], 0
        cur.append(line)
        size += len(line) + 1
    docs.append("\n".join(cur).strip())
    return [t for t in docs if t]


def to_documents(row):
    """A row -> a list of documents, each a list of {role, content} messages or a plain string.
    [] means unusable (no assistant reply, unknown roles, wrong types): documents_of says why."""
    return documents_of(row)[0]


def documents_of(row):
    """(documents, reason): the documents of a row (see to_documents), or [] and why it cannot be used."""
    if isinstance(row, Malformed):
        return [], row.why
    if not isinstance(row, dict):
        return [], f"a row is a JSON object, got a {type(row).__name__}"
    if _has_surrogates(row):
        return [], "a lone surrogate (e.g. \\ud800) in its text: not valid Unicode"
    try:
        if isinstance(row.get("messages"), list) or isinstance(row.get("conversations"), list):
            turns = row.get("messages") if isinstance(row.get("messages"), list) else row["conversations"]
            msgs = []
            for t in turns:
                who = str(t.get("role", t.get("from", ""))).lower()
                role = ROLES.get(who)
                content = t.get("content", t.get("value"))
                if role is None:
                    return [], f"a turn with the role {who!r} (understood: {', '.join(sorted(set(ROLES)))})"
                if not isinstance(content, str):
                    return [], f"a {who} turn whose content is a {type(content).__name__}, not text"
                msgs.append({"role": role, "content": content})
            return ([msgs], None) if _has_reply(msgs) else ([], "no assistant reply")
        if "instances" in row and isinstance(row.get("instruction"), str):
            out, why = [], None
            for inst in row["instances"]:
                docs, w = documents_of({"instruction": row["instruction"], **inst})
                out += docs
                why = why or w
            return (out, None) if out else ([], why or "no instances")
        if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
            user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
            return ([msgs], None) if _has_reply(msgs) else ([], "an empty output")
        if isinstance(row.get("prompt"), str):
            reply = row.get("response", row.get("completion"))
            msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": reply}]
            return ([msgs], None) if isinstance(reply, str) and _has_reply(msgs) else ([], "no text response")
        if isinstance(row.get("text"), str) and row["text"].strip():
            return [row["text"]], None
    except (AttributeError, TypeError) as e:
        return [], f"an unexpected shape ({e})"
    return [], ("none of the fields a row shape uses (messages, conversations, instruction + output, prompt + "
                f"response, text); it has {', '.join(sorted(map(str, row))[:6]) or 'none'}")


class Skipped:
    """Rows left out of a data build, each counted by reason and the first few named (file:row, reason)."""

    def __init__(self, src):
        self.src, self.by_reason, self.first = src, {}, []

    def add(self, where, why):
        why = why if len(why) <= 200 else why[:197] + "..."
        key = re.sub(r"\d+", "N", why.split(" (")[0])[:80]
        self.by_reason[key] = self.by_reason.get(key, 0) + 1
        if len(self.first) < 5:
            self.first.append(f"{where}: {why}")

    @property
    def n(self):
        return sum(self.by_reason.values())

    def text(self):
        if not self.n:
            return "no row skipped"
        reasons = "; ".join(f"{k}: {v}" for k, v in self.by_reason.items())
        return f"{self.n} row{'s' * (self.n > 1)} skipped ({reasons}); first: " + "; ".join(self.first)


def render_safely(fn, *args):
    """fn(*args), or (None, why) when the tokenizer or the chat template refuses this one conversation (a template
    that raises "system role not supported", say): one row is skipped, the build goes on."""
    try:
        return fn(*args), None
    except (ValueError, TypeError, UnicodeError) as e:
        why = str(e).split("; conversation")[0]
        return None, f"the tokenizer or chat template refused it ({type(e).__name__}: {why})"


def _has_reply(msgs):
    return any(m["role"] == "assistant" and m["content"].strip() for m in msgs)


def tokenize_document(tok: Tokenizer, doc):
    """-> (ids, assistant_mask) starting with BOS; plain text has every token marked."""
    if isinstance(doc, str):  # BOS where the model's tokenizer adds one (Llama 3, the byte level; not SmolLM2)
        ids = tok.encode(doc, bos=tok.add_bos and tok.bos_id is not None)
        return ids, [1] * len(ids)
    return tok.render_chat(doc)


# -----------------------------------------------------------------------------
# The token cache: tokenise once, memory-map afterwards


def build_cache(sources, tokenizer, cache_dir, val_every=50, log=print):
    """Tokenise `sources` into cache_dir/<hash>/{train,val}.bin (+ _mask.bin) and meta.json; reuse it if it exists.
    Document k goes to the held-out split when k % val_every == val_every - 1. Written to a temporary folder that
    is renamed into place, so an interrupted build is never mistaken for a finished one. Returns the folder."""
    tok = Tokenizer.from_name(tokenizer) if isinstance(tokenizer, str) else tokenizer
    stamp = [(s, os.path.getsize(s), os.path.getmtime(s)) if os.path.exists(s) else (s,) for s in sources]
    key = hashlib.sha256(json.dumps([CACHE_VERSION, stamp, tok.name, tok.fingerprint(), val_every]).encode()
                         ).hexdigest()[:16]
    out = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(out, "meta.json")):
        return out
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    streams = {"train": ([], []), "val": ([], [])}
    n_docs = n_bad = n_rows = 0
    per_source, firsts = {}, []
    t_last = time.time()
    for src in sources:
        good = n_tok = 0
        skipped = Skipped(src)
        for where, row in located_rows(src):
            n_rows += 1
            docs, why = documents_of(row)
            if not docs:
                skipped.add(where, why)
                continue
            for doc in docs:
                done, why = render_safely(tokenize_document, tok, doc)
                if done is None:
                    skipped.add(where, why)
                    continue
                ids, mask = done
                split = "val" if n_docs % val_every == val_every - 1 else "train"
                streams[split][0].append(np.asarray(ids + [tok.eos_id], dtype=dtype))
                streams[split][1].append(np.asarray(mask + [0], dtype=np.uint8))
                n_docs += 1
                good += 1
                n_tok += len(ids) + 1
            if time.time() - t_last > 10:  # large sources: say how far it got
                log(f"data: {src}: {n_rows} rows, {good} documents, {n_tok:,} tokens so far ...")
                t_last = time.time()
        per_source[src] = {"documents": good, "malformed_rows": skipped.n, "tokens": n_tok,
                           "skipped": skipped.by_reason, "malformed_first": skipped.first}
        n_bad += skipped.n
        firsts.extend(skipped.first[:2])
        log(f"data: {src}: {good} documents ({n_tok:,} tokens), {skipped.text()}")
    if n_docs == 0:
        raise BadInput(f"no usable documents in {sources} ({n_rows} rows read, {n_bad} skipped"
                       + (f"; first: {'; '.join(firsts[:3])}" if firsts else "") + "): check the paths and the row "
                       "format (see data.py's docstring for the shapes understood)")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = out + f".tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    meta = {"sources": sources, "tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "documents": n_docs, "malformed_rows": n_bad, "per_source": per_source, "val_every": val_every}
    for split, (ids, masks) in streams.items():
        ids = np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)
        masks = np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)
        ids.tofile(os.path.join(tmp, f"{split}.bin"))
        masks.tofile(os.path.join(tmp, f"{split}_mask.bin"))
        meta[f"{split}_tokens"] = int(len(ids))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same cache first: theirs is as good
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class PackedData:
    """Packed sequences of one split of a token cache. Sequence i covers tokens [i T, (i + 1) T + 1): inputs are
    its first T tokens, targets the last T. The order of the train split is a permutation by (seed, epoch); the
    batch of (step, micro-step, rank) is a pure function of them, so resuming at a step needs no data state."""

    def __init__(self, cache, split, seq_len, loss_on="all"):
        with open(os.path.join(cache, "meta.json")) as f:
            self.meta = json.load(f)
        dtype = np.dtype(self.meta["dtype"])
        n = self.meta[f"{split}_tokens"]
        self.tokens = np.memmap(os.path.join(cache, f"{split}.bin"), dtype=dtype, mode="r", shape=(n,)) if n else None
        self.mask = np.memmap(os.path.join(cache, f"{split}_mask.bin"), dtype=np.uint8, mode="r", shape=(n,)) if n else None
        if loss_on not in ("all", "assistant"):
            raise BadInput(f"loss_on={loss_on!r}: use 'all' (every token, as the paper) or 'assistant'")
        self.seq_len, self.loss_on = seq_len, loss_on
        self.n_seq = max(0, (n - 1) // seq_len)
        if self.n_seq == 0:
            raise BadInput(f"the {split} split has {n} tokens: not one sequence of seq_len {seq_len} + 1. "
                           "Add data, lower seq_len, or (for val) lower val_every")

    def get(self, indices):
        """-> x (B, T) int64 inputs, y (B, T) int64 targets (-100 where the loss is off)."""
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * T:(i + 1) * T + 1], dtype=np.int64) for i in indices])
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
        if self.loss_on == "assistant":
            m = np.stack([np.asarray(self.mask[i * T + 1:(i + 1) * T + 1]) for i in indices])
            y[torch.from_numpy(m == 0)] = -100
        return x, y

    def batch_indices(self, step, micro, rank, world, micro_batch, accum, seed):
        return batch_indices(self.n_seq, step, micro, rank, world, micro_batch, accum, seed)

    def has_targets(self):
        """Whether any token of the split is a target (loss_on="assistant": any assistant token at all)."""
        return self.loss_on == "all" or bool(np.any(self.mask[1:self.n_seq * self.seq_len + 1]))

    def check_sample(self, n_tokens):
        """The number of sequences sample(n_tokens) takes, or a ValueError when the split holds fewer."""
        n = -(-n_tokens // self.seq_len)
        if n > self.n_seq:
            raise BadInput(f"calibration needs {n} sequences of {self.seq_len} tokens ({n_tokens} tokens) but "
                           f"{self.meta['sources']} give only {self.n_seq}. Fix: fewer calib_tokens, a shorter "
                           "calib_seq_len, or more data")
        return n

    def sample(self, n_tokens, seed):
        """n_tokens (rounded up to whole sequences) as a seeded random choice of this split's sequences, in order:
        calibration data. -> LongTensor (N, seq_len) of inputs."""
        n = self.check_sample(n_tokens)
        return self.get(np.sort(np.random.default_rng(seed).choice(self.n_seq, n, replace=False)))[0]


def calibration_ids(sources, tok, cache_dir, n_tokens, seq_len, seed, val_every=50, log=print):
    """n_tokens of calibration from the train split of `sources`, tokenised into the same cache distill.py uses
    (see PackedData.sample). -> LongTensor (N, seq_len)."""
    return PackedData(build_cache(sources, tok, cache_dir, val_every, log=log), "train", seq_len).sample(n_tokens, seed)


@functools.lru_cache(maxsize=4)
def _order(n, epoch, seed):
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n, step, micro, rank, world, micro_batch, accum, seed):
    """Item ids of (step, micro-step, rank) out of n: consecutive slices of a permutation by (seed, epoch), wrapping
    epochs. A step covers the same items for any split of accum x world, so 1 and N processes agree, and the data
    position is a pure function of the step: resuming needs no data state."""
    start = ((step * accum + micro) * world + rank) * micro_batch
    return [int(_order(n, p // n, seed)[p % n]) for p in range(start, start + micro_batch)]


# -----------------------------------------------------------------------------
# Preference pairs (DPO): (prompt messages, chosen reply, rejected reply)

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_messages(transcript):
    """Anthropic HH-RLHF transcript "\n\nHuman: ...\n\nAssistant: ..." -> messages."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": text}
            for who, text in zip(parts[1::2], parts[2::2])]


def _messages(turns):
    out = []
    for t in turns:
        role = ROLES.get(str(t.get("role", t.get("from", ""))).lower()) if isinstance(t, dict) else None
        content = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if role is None or not isinstance(content, str):
            return None
        out.append({"role": role, "content": content})
    return out


def to_pair(row):
    """A preference row -> (prompt messages, chosen reply, rejected reply), or None when malformed. Shapes:
    chosen/rejected as full conversations sharing the prompt (ultrafeedback_binarized, orca_dpo_pairs,
    llama3-ultrafeedback-armorm); HH-RLHF transcripts whose prompt is the shared prefix; LLaMA-Factory
    {conversations, chosen: {from, value}, rejected: {from, value}}; {prompt | question (+ system), chosen, rejected}
    strings."""
    if not isinstance(row, dict):
        return None
    c, r = row.get("chosen"), row.get("rejected")
    prompt = None
    if isinstance(c, list) and isinstance(r, list):
        c, r = _messages(c), _messages(r)
        if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            return None
        prompt, c, r = c[:-1], c[-1]["content"], r[-1]["content"]
        if not prompt and isinstance(row.get("prompt"), str):
            prompt = [{"role": "user", "content": row["prompt"]}]
        if _messages(row["rejected"])[:-1] not in (prompt, []):
            return None
    elif isinstance(c, str) and isinstance(r, str) and c.startswith("\n\nHuman:"):
        cm, rm = _hh_messages(c), _hh_messages(r)
        if not cm or not rm or cm[:-1] != rm[:-1] or cm[-1]["role"] != "assistant" or rm[-1]["role"] != "assistant":
            return None
        prompt, c, r = cm[:-1], cm[-1]["content"], rm[-1]["content"]
    elif isinstance(c, dict) and isinstance(r, dict) and isinstance(row.get("conversations"), list):
        prompt = _messages(row["conversations"])
        c, r = c.get("value", c.get("content")), r.get("value", r.get("content"))
    elif isinstance(c, str) and isinstance(r, str):
        q = row.get("prompt", row.get("question"))
        if isinstance(q, str):
            prompt = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + \
                     [{"role": "user", "content": q}]
    if not prompt or not isinstance(c, str) or not isinstance(r, str):
        return None
    if not c.strip() or not r.strip() or c.strip() == r.strip():
        return None                                   # empty reply, or nothing to prefer
    return prompt, c, r


def tokenize_pair(tok: Tokenizer, pair, max_length, max_prompt_length, long_prompts="truncate"):
    """-> (prompt ids, chosen ids, rejected ids) within the limits, or None (dropped). A prompt longer than
    max_prompt_length keeps BOS and its END (the turns right before the reply; long_prompts="drop" drops the pair
    instead); each reply (+ <|eot_id|>) keeps its START, cut so prompt + reply <= max_length."""
    prompt, chosen, rejected = pair
    p = tok.render_chat(prompt, add_generation_prompt=True)[0]
    if len(p) > max_prompt_length:
        if long_prompts == "drop":
            return None
        p = p[:1] + p[len(p) - max_prompt_length + 1:]
    room = max_length - len(p)
    c = (tok.encode(chosen.strip()) + [tok.eot_id])[:room]
    r = (tok.encode(rejected.strip()) + [tok.eot_id])[:room]
    return (p, c, r) if room > 0 and c != r else None


def load_pairs(sources, tok, max_length, max_prompt_length, long_prompts="truncate", log=print):
    """Tokenised pairs of all sources, with counts of what was dropped and why (the first few named, file:row)."""
    pairs, dropped, firsts = [], {"malformed": 0, "prompt_too_long_or_identical_after_truncation": 0}, []
    for src in sources:
        n0 = len(pairs)
        skipped = Skipped(src)
        for where, row in located_rows(src):
            pair = None if isinstance(row, Malformed) or _has_surrogates(row) else to_pair(row)
            if pair is None:
                dropped["malformed"] += 1
                skipped.add(where, row.why if isinstance(row, Malformed) else "a lone surrogate (not valid Unicode)"
                            if _has_surrogates(row) else "not a preference pair (see data.to_pair for the shapes)")
                continue
            t, why = render_safely(tokenize_pair, tok, pair, max_length, max_prompt_length, long_prompts)
            if why is not None:
                dropped["malformed"] += 1
                skipped.add(where, why)
                continue
            if t is None:
                dropped["prompt_too_long_or_identical_after_truncation"] += 1
                continue
            pairs.append(t)
        firsts.extend(skipped.first[:2])
        log(f"data: {src}: {len(pairs) - n0} pairs; {skipped.text()}")
    log(f"data: {len(pairs)} pairs kept; dropped {dropped} (malformed: identical or empty replies, no shared prompt)")
    if not pairs:
        raise BadInput(f"no usable preference pairs in {sources}" + (f" (first: {'; '.join(firsts[:3])})" if firsts
                                                                        else "")
                       + ": check paths and row shapes (see data.to_pair)")
    return pairs, dropped


def collate_pairs(pairs, pad_id):
    """B pairs -> x (2B, T), y (2B, T): chosen sequences first, then rejected; y holds the next token on reply
    positions and -100 elsewhere (prompt and padding), so summed log-probs cover the response only."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    T = max(len(p) + len(a) for p, a in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        ids = torch.tensor(p + a)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, len(p) - 1:len(ids) - 1] = ids[len(p):]
    return x, y


if __name__ == "__main__":
    from configurator import configure
    sources = ["assets/data/sft/alpaca_en_demo.json"]   # files or hub ids to tokenise
    tokenizer = "bytes"        # "bytes", "llama3", a model folder or a tokenizer.model path
    cache_dir = "out/data_cache"
    val_every = 50             # every val_every-th document is held out
    configure(globals(), positional=("sources",))  # python data.py FILE [FILE ...]: bare arguments are the sources
    check_sources(sources)
    cache = build_cache(sources, tokenizer, cache_dir, val_every)
    print(cache)
    print(open(os.path.join(cache, "meta.json")).read())
