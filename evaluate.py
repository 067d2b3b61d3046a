"""
Evaluation: zero-shot multiple choice exactly as lm-evaluation-harness scores it (the paper's tables), perplexity,
KL to a teacher, KV-cache size, and decode speed against the source model.

    python evaluate.py --model=assets/models/tiny_kv8 --tasks=all --data_dir=tests/fixtures/eval   # bundled slices
    python evaluate.py --model=meta-llama/Llama-3.2-1B-Instruct --tasks=all --device=cuda    # the model's tokenizer
    python evaluate.py --model=DIR --tasks=mmlu --num_fewshot=5 --data_dir=out/eval_full      # MMLU 5-shot
    python evaluate.py --model=DIR --tasks=none --ppl_data=assets/data/corpus/tinyshakespeare.txt --teacher=DIR2
    python evaluate.py --model=DIR --tasks=none --speed=True --source=DIR2      # decode tokens/s, MLA vs GQA
    python evaluate.py --convert_from=PATH/eval --data_dir=out/eval_full     # local raw sets -> hub field names

Multiple choice, as lm-evaluation-harness 0.4.13 does it (its task configs and versions are recorded in the results;
the paper used its older big-refactor branch, whose RACE prompt differed: harness PR #3716):
  - each choice is a (context, continuation) request; the continuation is the target delimiter " " + the choice
    (winogrande: the option fills the blank in the context and the rest of the sentence is the continuation);
  - context and continuation are tokenised together and split at the context's length, after moving trailing
    spaces of the context to the continuation (so merges across the boundary behave as in lm-eval); BOS as the
    model's tokenizer adds it by default (the harness follows the tokenizer since 0.4.10: Llama 3 adds one,
    SmolLM2 does not);
  - requests that share a context and whose continuations are single tokens (MMLU's " A".." D", PubMedQA's
    " yes"/" no"/" maybe") are scored from one forward pass of the context, as the harness does;
  - acc = argmax of the summed continuation log-likelihood; acc_norm = argmax of it divided by the length of the
    choice string (lm-eval's len(choice)); standard errors are sample std / sqrt(n); MMLU's groups and total
    weigh subjects by size, with pooled standard errors, as lm-eval reports them (N/A, written null, where a
    subject has a single document);
  - --limit takes the first N documents of each task, and of each MMLU subject (the subjects are tasks there);
  - --num_fewshot: MMLU only, the harness's first_n examples of the subject's dev split. The other tasks draw their
    examples with a seeded random sampler over their training splits, which is not reproduced here.
"""
import json
import math
import os
import re
import sys
import time

import torch

from errors import BadInput, NotFound
from folders import check_replaceable, check_results_file, write_folder, write_results_file
from ops import linear_kl, linear_logprobs

# -----------------------------------------------------------------------------
# Tasks: where the documents come from, and how a document becomes requests

HUB = {  # task -> (dataset id, config, split), the ids lm-eval uses
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "mmlu": ("cais/mmlu", "all", "test"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
    "piqa": ("baber/piqa", None, "validation"),  # ybisk/piqa needs a loading script datasets >= 4 does not run
    "pubmedqa": ("bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source", "test"),  # big-refactor's: 500 test items
    "race": ("EleutherAI/race", "high", "test"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
}
HARNESS_VERSION = "0.4.13"  # the lm-evaluation-harness whose task code these prompts follow
TASK_VERSIONS = {"arc_challenge": 1.0, "arc_easy": 1.0, "hellaswag": 1.0, "mmlu": 1.0, "openbookqa": 1.0,
                 "piqa": 1.0, "pubmedqa": 1.0, "race": 3.0, "winogrande": 1.0}  # metadata.version of each yaml
TASKS = ["arc_challenge", "arc_easy", "hellaswag", "mmlu", "openbookqa", "piqa", "pubmedqa", "race", "winogrande"]
NORM = {"arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa"}  # tasks lm-eval reports acc_norm for

MMLU_GROUPS = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
                       "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}


def _hellaswag_clean(text):
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def build_requests(task, doc, fewshot=()):
    """A document in the hub's field names -> (contexts, continuations, gold, choices) with one entry per choice;
    `choices` are the strings acc_norm divides by. `fewshot`: solved examples put before the question (MMLU)."""
    if task in ("arc_easy", "arc_challenge"):
        ctx, choices = f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"])
        gold = list(doc["choices"]["label"]).index(doc["answerKey"])
    elif task == "hellaswag":
        if "query" in doc:      # already processed (lm-eval's process_docs output)
            ctx, choices, gold = doc["query"], list(doc["choices"]), int(doc["gold"])
        else:
            ctx = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
            choices, gold = [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"])
    elif task == "piqa":
        ctx, choices, gold = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"])
    elif task == "openbookqa":
        ctx, choices = doc["question_stem"], list(doc["choices"]["text"])
        gold = list(doc["choices"]["label"]).index(doc["answerKey"].lstrip())
    elif task == "pubmedqa":
        ctx = "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(doc["CONTEXTS"]), doc["QUESTION"])
        choices = ["yes", "no", "maybe"]
        gold = choices.index(doc["final_decision"])
    elif task == "mmlu":
        subject = doc["subject"].replace("_", " ")

        def text(d):
            c = d["choices"]
            return f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
        # description, then each example as question + " " + answer + "\n\n" (the harness's fewshot_delimiter)
        shots = "".join(text(d) + " " + "ABCD"[int(d["answer"])] + "\n\n" for d in fewshot)
        ctx = f"The following are multiple choice questions (with answers) about {subject}.\n\n" + shots + text(doc)
        choices, gold = ["A", "B", "C", "D"], int(doc["answer"])
    elif task == "race":
        problems = doc["problems"] if isinstance(doc["problems"], list) else _literal(doc["problems"])
        ctx = "Article: " + doc["article"] + "\n\n"
        for p in problems[:-1]:
            answer = p["options"]["ABCD".index(p["answer"])]
            if p["question"][-6:] == "  _  .":  # a cloze question: the answer fills the blank (race 3.0)
                ctx += p["question"][:-5] + answer + "\n"
            else:
                ctx += "Question: " + p["question"] + "\n" + "Answer: " + answer + "\n"
        last = problems[-1]
        ctx += last["question"]
        choices, gold = list(last["options"][:4]), "ABCD".index(last["answer"])
    elif task == "winogrande":  # partial scoring: the option completes the context, the rest is the continuation
        i = doc["sentence"].index("_")
        contexts = [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]
        cont = " " + doc["sentence"][i + 1:].strip()
        return contexts, [cont, cont], {"1": 0, "2": 1}[str(doc["answer"])], contexts
    else:
        raise BadInput(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return [ctx] * len(choices), [" " + c for c in choices], gold, choices


def _literal(s):
    import ast
    return ast.literal_eval(s)


def check_tasks(tasks):
    """Task names -> the list to run; an unknown name is an error that suggests the closest one."""
    import difflib
    names = TASKS if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip() and t.strip() != "none"]
    twice = sorted({t for t in names if names.count(t) > 1})
    if twice:
        raise BadInput(f"tasks lists {', '.join(map(repr, twice))} more than once: each task is scored once (and "
                       "counted once in the average). Fix: name each task once")
    for t in names:
        if t not in HUB:
            close = difflib.get_close_matches(t, TASKS, n=1)
            raise BadInput(f"unknown task {t!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; tasks: {', '.join(TASKS)} or 'all'")
    return names


def load_docs(task, data_dir=None, limit=None, split=None):
    """Documents of a task: data_dir/<task>.jsonl (hub field names) if given, else the hub dataset lm-eval uses.
    limit: the first N documents, per subject for MMLU (the harness's subjects are separate tasks).
    split="dev": MMLU's few-shot examples (data_dir/mmlu_dev.jsonl)."""
    name = task + ("_dev" if split == "dev" else "")
    if data_dir:
        path = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.exists(path):
            raise NotFound(f"{path} not found: convert the raw local sets into {data_dir} with "
                           "--convert_from=RAW_DIR, or drop --data_dir to read the hub")
        docs, where = [], []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise BadInput(f"{path}:{n}: not a JSON row ({e.msg}). Fix: one JSON object per line, "
                                       "or re-convert with --convert_from=RAW_DIR") from None
                    where.append(f"{path}:{n}")
    else:
        import datasets
        hub_id, config, hub_split = HUB[task]
        # EleutherAI/race holds one row per article already, its questions in a `problems` field
        try:
            docs = list(datasets.load_dataset(hub_id, config, split=split or hub_split))
        except OSError as e:  # offline (ConnectionError), no cache, or a dataset gone (FileNotFoundError)
            raise BadInput(f"task {task}: the hub dataset {hub_id} ({config or 'default'}) cannot be read here "
                           f"({type(e).__name__}: {str(e)[:120]}). Fix: connect to the hub once (the datasets "
                           "cache keeps it), or --data_dir=DIR of local <task>.jsonl (tests/fixtures/eval holds "
                           "slices; --convert_from makes the full sets from raw files)") from None
        where = [f"{hub_id} {split or hub_split} row {i}" for i in range(len(docs))]
    at = {id(d): w for d, w in zip(docs, where)}
    docs = limit_docs(task, docs, limit)
    for doc in docs:  # every row used is readable and its gold answer is one of its choices: now, not mid-run
        check_doc(task, doc, at[id(doc)])
    return docs


def check_doc(task, doc, where):
    """Raise, naming the row, unless build_requests can read `doc` and its gold answer indexes one of its choices (a
    label out of range used to be scored as a miss)."""
    try:
        _, conts, gold, _ = build_requests(task, doc)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, SyntaxError) as e:
        raise BadInput(f"{where}: a {task} row this scorer cannot read ({type(e).__name__}: {e}). Fix: the hub's "
                       "field names (docs/training.md, 'Evaluation'), or re-convert with --convert_from=RAW_DIR"
                       ) from None
    if not (isinstance(gold, int) and 0 <= gold < len(conts)):
        raise BadInput(f"{where}: gold answer {gold!r} is not one of the row's {len(conts)} choices. Fix: the row's "
                       "label")


def limit_docs(task, docs, limit):
    if not limit:
        return docs
    if task != "mmlu":
        return docs[:limit]
    counts, out = {}, []
    for d in docs:
        if counts.get(d["subject"], 0) < limit:
            out.append(d)
        counts[d["subject"]] = counts.get(d["subject"], 0) + 1
    return out


# -----------------------------------------------------------------------------
# Scoring


def encode_pair(tok, context, continuation, add_bos=False):
    """lm-eval's _encode_pair: trailing spaces of the context move to the continuation; the whole string is
    tokenised and split at the context's token length."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    prefix = [tok.bos_id] if add_bos or not ctx else []  # an empty context is scored after BOS (lm-eval's prefix)
    return prefix + ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, tok, pairs, batch_size=16, add_bos=False, progress=None):
    """[(context, continuation)] -> [summed log p(continuation | context)], scored in batches sorted by length
    (longest first, as lm-eval), truncated on the left to the model's max_seq_len. Requests with the same context
    ids and a one-token continuation share one forward pass of the context (the harness does the same), which
    gives the same numbers: the continuation's log-prob is read at the context's last position either way."""
    dev = model.lm_head.weight.device
    enc = [encode_pair(tok, c, x, add_bos) for c, x in pairs]
    L = model.config.max_seq_len
    out = [0.0] * len(enc)
    groups, multi = {}, []
    for i, (ctx, cont) in enumerate(enc):
        if len(cont) == 1:
            groups.setdefault(tuple(ctx), []).append(i)
        else:
            multi.append(i)
    shared = [g for g in groups.values() if len(g) > 1]
    multi += [g[0] for g in groups.values() if len(g) == 1]
    total, done = len(enc), 0
    # one-token continuations of a shared context: one forward each, the log-softmax at its last position
    order = sorted(shared, key=lambda g: -len(enc[g[0]][0]))
    for b in range(0, len(order), batch_size):
        grp = order[b:b + batch_size]
        seqs = [enc[g[0]][0][-L:] for g in grp]
        T = max(len(q) for q in seqs)
        x = torch.zeros(len(grp), T, dtype=torch.long)
        for j, q in enumerate(seqs):
            x[j, :len(q)] = torch.tensor(q)
        last = torch.tensor([len(q) - 1 for q in seqs], device=dev)
        def head(h, W):  # only the context's last position: (groups, V) log-probs, fp32 at least
            logits = h[torch.arange(len(grp), device=dev), last] @ W.T
            return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        lp = model(x.to(dev), head_fn=head)
        for j, g in enumerate(grp):
            for i in g:
                out[i] = lp[j, enc[i][1][0]].item()
        done += sum(len(g) for g in grp)
        if progress:
            progress(done, total)
    order = sorted(multi, key=lambda i: -len(enc[i][0]) - len(enc[i][1]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        seqs = [(enc[i][0] + enc[i][1])[-(L + 1):] for i in idx]
        T = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(idx), T, dtype=torch.long)
        y = torch.full((len(idx), T), -100, dtype=torch.long)    # targets on the continuation tokens only
        for j, (i, s) in enumerate(zip(idx, seqs)):
            n = len(enc[i][1])
            x[j, :len(s) - 1] = torch.tensor(s[:-1])
            y[j, len(s) - 1 - n:len(s) - 1] = torch.tensor(s[-n:])
        # per-token log-probs from the hidden states in chunks (ops.linear_logprobs): no (B, T, V) logits
        y = y.to(dev)
        lp = model(x.to(dev), head_fn=lambda h, W: linear_logprobs(h.flatten(0, 1), W, y.flatten()))
        for j, ll in zip(idx, lp.view(y.shape).sum(-1).tolist()):  # -100 positions contribute 0
            out[j] = ll
        done += len(idx)
        if progress:
            progress(done, total)
    return out


def mean_stderr(xs):
    """Sample std / sqrt(n); None (the harness's "N/A") for fewer than two documents."""
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def score_task(model, tok, task, docs, batch_size=16, add_bos=False, progress=None, fewshot=None):
    """Per-document correctness and task metrics {acc, acc_stderr, [acc_norm, acc_norm_stderr], n}.
    fewshot: subject -> solved examples (MMLU)."""
    reqs, spans = [], []
    for doc in docs:
        ctxs, conts, gold, choices = build_requests(task, doc, (fewshot or {}).get(doc.get("subject"), ()))
        spans.append((len(reqs), len(ctxs), gold, choices))
        reqs.extend(zip(ctxs, conts))
    lls = loglikelihoods(model, tok, reqs, batch_size, add_bos, progress)
    acc, acc_norm = [], []
    for start, k, gold, choices in spans:
        ll = lls[start:start + k]
        acc.append(float(max(range(k), key=lambda i: ll[i]) == gold))
        acc_norm.append(float(max(range(k), key=lambda i: ll[i] / len(choices[i])) == gold))
    res = {"acc": sum(acc) / len(acc), "acc_stderr": mean_stderr(acc), "n": len(acc)}
    if task in NORM:
        res.update(acc_norm=sum(acc_norm) / len(acc_norm), acc_norm_stderr=mean_stderr(acc_norm))
    return res, acc


def aggregate_mmlu(docs, correct):
    """Per subject, per group and overall accuracy, weighted by size, with pooled standard errors (lm-eval)."""
    per = {}
    for doc, c in zip(docs, correct):
        per.setdefault(doc["subject"], []).append(c)
    subjects = {s: {"acc": sum(v) / len(v), "acc_stderr": mean_stderr(v), "n": len(v)} for s, v in per.items()}

    def pool(names):
        rows = [subjects[s] for s in names if s in subjects]
        n = sum(r["n"] for r in rows)
        acc = sum(r["acc"] * r["n"] for r in rows) / n
        if any(r["acc_stderr"] is None for r in rows):  # the harness: one N/A subject makes the group's N/A
            return {"acc": acc, "acc_stderr": None, "n": n}
        var = sum((r["n"] - 1) * r["acc_stderr"] ** 2 * r["n"] for r in rows) / (n - len(rows))
        return {"acc": acc, "acc_stderr": math.sqrt(var / n), "n": n}

    groups = {g: pool(s.split()) for g, s in MMLU_GROUPS.items() if any(x in subjects for x in s.split())}
    return pool(list(subjects)), groups, subjects


# -----------------------------------------------------------------------------
# Beyond accuracy: perplexity and KL, KV cache, decode speed


@torch.no_grad()
def perplexity_and_kl(model, tok, text, seq_len, teacher=None, max_tokens=None):
    """Token-level perplexity of `text` in windows of seq_len (each window starts with BOS), and the mean
    KL(teacher || model) per token when a teacher is given."""
    ids = tok.encode(text)[:max_tokens]
    dev = model.lm_head.weight.device
    stats = torch.zeros(4, device=dev)  # sum KL, sum CE, sum teacher CE, tokens (ops.linear_kl, chunked)
    for s in range(0, len(ids) - 1, seq_len - 1):
        chunk = [tok.bos_id] + ids[s:s + seq_len - 1]
        if len(chunk) < 2:
            break
        x = torch.tensor([chunk[:-1]], device=dev)
        y = torch.tensor(chunk[1:], device=dev)
        h_t = W_t = None
        if teacher is not None:
            h_t, W_t = teacher.forward_hidden(x)[0], teacher.lm_head.weight
        stats += model(x, head_fn=lambda h, W: linear_kl(h[0], W, h_t, W_t, y, torch.ones_like(y, dtype=torch.float),
                                                         kl_weight=float(teacher is not None), ce_weight=1.0))[1]
    kl, nll, _, n = stats.tolist()
    return {"tokens": int(n), "nll": nll / n, "perplexity": math.exp(nll / n),
            **({"kl_teacher_student": kl / n} if teacher is not None else {})}


def kv_report(model, source=None, batch=1, context=32768, dtype=torch.bfloat16):
    per_layer = [b.mixer.cache_elements_per_token() for b in model.model.layers]
    rep = {"elements_per_token_per_layer": per_layer, "elements_per_token": sum(per_layer),
           "state_bytes": model.state_bytes(batch, dtype),  # Mamba2 layers: fixed, whatever the context
           "bytes": model.kv_cache_bytes(batch, context, dtype), "batch": batch, "context": context,
           "dtype": str(dtype).replace("torch.", "")}
    if source is not None:
        rep["source_elements_per_token"] = source.kv_cache_elements_per_token()
        # bytes at this context, so a hybrid's fixed Mamba2 state counts too (per token it would vanish)
        rep["percent_of_source"] = 100 * rep["bytes"] / source.kv_cache_bytes(batch, context, dtype)
    return rep


@torch.no_grad()
def decode_speed(model, batch, context, new_tokens=32, repeats=1, prefill=True):
    """Tokens/s of generate's decode steps (prefill timed apart) with the model's real cache, random prompt ids.
    prefill=False decodes from position `context` against caches that were allocated but never filled (zeros):
    the same work per step, without a long prompt's prefill (whose attention scores, at 32K tokens, a CPU cannot
    hold)."""
    dev = model.lm_head.weight.device
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device=dev,
                           generator=torch.Generator(device=dev).manual_seed(0))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        model.setup_caches(batch, context + new_tokens)
        sync()
        t0 = time.time()
        if prefill:
            logits = model(prompt, input_pos=torch.arange(context, device=dev))[:, -1]
        else:
            logits = model(prompt[:, -1:], input_pos=torch.tensor([context - 1], device=dev))[:, -1]
        sync()
        t1 = time.time()
        for t in range(new_tokens):
            logits = model.decode_step(logits.argmax(-1, keepdim=True), torch.tensor([context + t], device=dev))
        sync()
        best = min(best, time.time() - t1)
        model.clear_caches()
    return {"batch": batch, "context": context, "new_tokens": new_tokens, "prefill_s": t1 - t0 if prefill else None,
            "decode_tokens_per_s": batch * new_tokens / best}


# -----------------------------------------------------------------------------
# Local raw sets -> hub field names (the formats in the project's data notes)


def convert_local(raw, out_dir, limit=None):
    """Convert the raw local evaluation files under `raw` into out_dir/<task>.jsonl with the hub's field names."""
    import bz2
    import csv
    import glob
    check_replaceable(os.path.abspath(out_dir))  # before reading anything
    out = {}
    for task in ("arc_easy", "arc_challenge"):
        rows = [json.loads(l) for l in open(os.path.join(raw, "llm_foundry", f"{task}.jsonl"))]
        labels = "ABCDE"
        out[task] = [{"question": r["query"].removeprefix("Question: ").removesuffix("\nAnswer:"),
                      "choices": {"text": r["choices"], "label": list(labels[:len(r["choices"])])},
                      "answerKey": labels[r["gold"]]} for r in rows]
    lines = bz2.open(os.path.join(raw, "hellaswag_val_full.txt.bz2"), "rt").read().split("\n")
    out["hellaswag"] = [{"query": lines[i], "choices": lines[i + 2:i + 6], "gold": int(lines[i + 1])}
                        for i in range(0, len(lines) - 5, 6)]
    labels = open(os.path.join(raw, "piqa_valid_labels.lst")).read().split()
    out["piqa"] = [{**json.loads(l), "label": int(y)} for l, y in zip(open(os.path.join(raw, "piqa_valid.jsonl")), labels)]
    pq = json.load(open(os.path.join(raw, "pubmedqa_ori_pqal.json")))
    test = json.load(open(os.path.join(raw, "pubmedqa_test_ground_truth.json")))
    out["pubmedqa"] = [{"QUESTION": pq[k]["QUESTION"], "CONTEXTS": pq[k]["CONTEXTS"],
                        "final_decision": test[k]} for k in test]
    rows = list(csv.reader(open(os.path.join(raw, "openbookqa_test.tsv")), delimiter="\t"))[1:]
    out["openbookqa"] = []
    for r in rows:
        opts = re.findall(r"\(([A-D])\) (.*?)(?= \([A-D]\) |$)", r[2])
        out["openbookqa"].append({"question_stem": r[1], "choices": {"text": [t for _, t in opts],
                                                                     "label": [l for l, _ in opts]},
                                  "answerKey": r[4]})
    out["winogrande"] = []
    for l in open(os.path.join(raw, "llm_foundry", "winogrande.jsonl")):
        r = json.loads(l)
        a, b = r["context_options"]
        k = len(os.path.commonprefix([a, b]))
        k = a.rfind(" ", 0, k + 1) + 1 if k < len(a) else k  # back off to the word boundary before the blank
        out["winogrande"].append({"sentence": a[:k] + "_ " + r["continuation"], "option1": a[k:], "option2": b[k:],
                                  "answer": str(r["gold"] + 1)})
    for split, name in (("test", "mmlu"), ("dev", "mmlu_dev")):  # dev: MMLU's few-shot examples
        out[name] = []
        for path in sorted(glob.glob(os.path.join(raw, "mmlu", split, f"*_{split}.csv"))):
            subject = os.path.basename(path)[:-len(f"_{split}.csv")]
            for r in list(csv.reader(open(path)))[1:]:
                out[name].append({"question": r[0], "choices": r[1:5], "answer": int(r[5]), "subject": subject})

    def fill(tmp):
        for task, docs in out.items():
            with open(os.path.join(tmp, f"{task}.jsonl"), "w") as f:
                for d in (docs if task == "mmlu_dev" else limit_docs(task, docs, limit)):
                    f.write(json.dumps(d) + "\n")

    write_folder(out_dir, fill, "evaluate.convert_local")  # a folder it wrote before, or a new one: nothing else
    return {t: len(d) for t, d in out.items()}


def markdown_table(results, tasks):
    head = "| model | " + " | ".join(tasks) + " | avg |"
    rows = [head, "|" + "---|" * (len(tasks) + 2)]
    for name, res in results.items():
        vals = []
        for t in tasks:
            r = res[t]
            vals.append(100 * r.get("acc_norm", r["acc"]))
        cells = [_pct(res[t]["acc"]) + (f" / {_pct(res[t]['acc_norm'])}" if "acc_norm" in res[t] else "")
                 for t in tasks]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {sum(vals) / len(vals):.2f} |")
    return "\n".join(rows) + "\n\n(acc / acc_norm where lm-eval reports both; avg over acc_norm where present, " \
                              "else acc, as the paper's tables)"


def write_results(path, results):
    """Valid JSON, written atomically; only a results file this project wrote is ever replaced (folders.py)."""
    write_results_file(path, results, "evaluate.py")


def _pct(x):
    return "N/A" if x is None else f"{100 * x:.2f}"


if __name__ == "__main__":
    from configurator import configure, require
    from folders import check_apart, resolve_checkpoint
    from model import Transformer, resolve_dtype
    from tokenizer import Tokenizer, check_tokenizer_for

    # -----------------------------------------------------------------------------
    # settings
    model = "assets/models/tiny_kv8"     # HF Llama folder, project checkpoint or hub id
    tokenizer = ""             # "" = the model folder's own; or "llama3", "bytes", a folder, a tokenizer.model path
    tasks = "all"              # comma-separated, "all" (the paper's nine) or "none"
    data_dir = ""              # local <task>.jsonl in hub field names; "" = the hub datasets
    limit = 0                  # documents per task, per subject for MMLU (0 = all)
    num_fewshot = 0            # solved examples before each question (MMLU only: its dev split, first_n)
    batch_size = 16
    add_bos: bool | str = "auto"  # "auto": as the model's tokenizer does by default (the harness since 0.4.10)
    device = "auto"
    dtype = "auto"             # bfloat16 on GPU, float32 on CPU
    ppl_data = ""              # a text file (or .jsonl of {"text"}) for perplexity
    ppl_tokens = 100000
    teacher = ""               # with ppl_data: also KL(teacher || model) per token
    source = ""                # the source Llama: KV-cache percentage and decode-speed ratio
    speed = False              # decode tokens/s at speed_batches x speed_contexts (model, and source if given)
    speed_batches = [1, 8]
    speed_contexts = [256, 1024]
    kv_context = 32768         # context for the KV-cache bytes report
    out = "out/eval/results.json"   # written after every task, so a later failure loses nothing
    convert_from = ""          # convert raw local sets (see convert_local) into data_dir, then exit (honours limit)
    config = configure(globals())
    # -----------------------------------------------------------------------------
    require(config, limit=(0, None), num_fewshot=(0, None), batch_size=(1, None), ppl_tokens=(1, None),
            kv_context=(1, None))
    for name in ("speed_batches", "speed_contexts"):
        if not all(isinstance(v, int) and v >= 1 for v in config[name]) or not config[name]:
            raise BadInput(f"{name}={config[name]!r}: must be a list of integers >= 1")
    if convert_from:
        check_apart(data_dir or "out/eval_data", "data_dir", {"convert_from": convert_from})
        print(convert_local(convert_from, data_dir or "out/eval_data", limit or None))
        sys.exit(0)
    check_results_file(os.path.abspath(os.path.expanduser(out)))  # before any scoring: --out replaces only our own
    check_apart(out, "out", {"model": model, "teacher": teacher, "source": source, "ppl_data": ppl_data,
                             "data_dir": data_dir})
    # pre-flight: task names, their data, the tokenizer against the model, before anything is scored
    names = check_tasks(tasks)
    folder = resolve_checkpoint(model)  # the model is found before any task data is read
    if num_fewshot and any(t != "mmlu" for t in names):
        raise BadInput(f"num_fewshot={num_fewshot}: few-shot is implemented for MMLU only (the harness's first_n "
                       "examples of its dev split); run the other tasks zero-shot in a separate call")
    if add_bos not in (True, False, "auto"):
        raise BadInput(f"add_bos={add_bos!r}: use True, False or 'auto'")
    docs_of = {t: load_docs(t, data_dir or None, limit or None) for t in names}
    fewshot = None
    if num_fewshot:
        dev_docs = load_docs("mmlu", data_dir or None, split="dev")
        fewshot = {}
        for d in dev_docs:
            fewshot.setdefault(d["subject"], []).append(d)
        short = [s for s in {d["subject"] for d in docs_of["mmlu"]} if len(fewshot.get(s, [])) < num_fewshot]
        if short:
            raise BadInput(f"num_fewshot={num_fewshot}: the dev split has fewer examples for {sorted(short)[:5]}")
        fewshot = {k: v[:num_fewshot] for k, v in fewshot.items()}
    if ppl_data and not os.path.exists(ppl_data):
        raise NotFound(f"ppl_data {ppl_data!r} not found")
    for other in (teacher, source):  # the models read after the tasks: found now, not after scoring
        if other:
            resolve_checkpoint(other)
    tok = Tokenizer.from_name(tokenizer, folder)
    check_tokenizer_for(tok, folder)
    for role, other in (("teacher", teacher), ("source", source)):  # a KL across tokenizers is a number of nothing
        if other:
            check_tokenizer_for(tok, resolve_checkpoint(other), role)
    bos = tok.add_bos if add_bos == "auto" else add_bos
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    dt = resolve_dtype(dtype, torch.device(dev).type)
    m = Transformer.from_pretrained(folder, dtype=dt, device=dev).eval()
    results = {"config": config, "model_config": m.config.to_hf(), "tokenizer": tok.describe(), "add_bos": bos,
               "harness": {"lm_eval": HARNESS_VERSION, "task_versions": {t: TASK_VERSIONS[t] for t in names},
                           "num_fewshot": num_fewshot}, "tasks": {}}
    for task in names:
        docs = docs_of[task]
        t0 = time.time()
        show = lambda i, n: print(f"\r{task}: {i}/{n} requests", end="", file=sys.stderr, flush=True)
        res, correct = score_task(m, tok, task, docs, batch_size, bos, show, fewshot if task == "mmlu" else None)
        print(file=sys.stderr)
        if task == "mmlu":
            res_all, groups, subjects = aggregate_mmlu(docs, correct)
            res = {**res_all, "groups": groups, "subjects": subjects}
        res["seconds"] = round(time.time() - t0, 1)
        res["version"] = TASK_VERSIONS[task]
        results["tasks"][task] = res
        write_results(out, results)  # after every task
        print(f"{task}: acc {_pct(res['acc'])} ± {_pct(res['acc_stderr'])}"
              + (f"  acc_norm {_pct(res['acc_norm'])} ± {_pct(res['acc_norm_stderr'])}"
                 if "acc_norm" in res else "") + f"  (n={res['n']})")
    if names:
        print(markdown_table({os.path.basename(model.rstrip("/")): results["tasks"]}, names))
    src = Transformer.from_pretrained(source, dtype=dt, device=dev).eval() if source else None
    if ppl_data:
        text = open(ppl_data).read() if not ppl_data.endswith(".jsonl") else \
            "\n\n".join(json.loads(l)["text"] for l in open(ppl_data))
        t = Transformer.from_pretrained(teacher, dtype=dt, device=dev).eval() if teacher else None
        results["perplexity"] = perplexity_and_kl(m, tok, text, min(m.config.max_seq_len, 1024), t, ppl_tokens)
        print(f"perplexity: {results['perplexity']}")
    results["kv_cache"] = kv_report(m, src, context=kv_context)
    kv = results["kv_cache"]
    print(f"KV cache: {kv['elements_per_token']} numbers per token"
          + (f", plus {kv['state_bytes'] / 2**20:.2f} MiB of Mamba2 state" if kv["state_bytes"] else "")
          + f"; {kv['bytes'] / 2**20:.1f} MiB at batch 1, context {kv_context}, bf16"
          + (f" = {kv['percent_of_source']:.1f}% of the source's" if src else ""))
    if speed:
        results["speed"] = []
        for b in speed_batches:
            for c in speed_contexts:
                row = {"model": decode_speed(m, b, c)}
                if src is not None:
                    row["source"] = decode_speed(src, b, c)
                    row["ratio"] = row["model"]["decode_tokens_per_s"] / row["source"]["decode_tokens_per_s"]
                results["speed"].append(row)
                print(f"decode batch {b} context {c}: {row['model']['decode_tokens_per_s']:,.0f} tok/s"
                      + (f" vs source {row['source']['decode_tokens_per_s']:,.0f} ({row['ratio']:.2f}x)"
                         if src is not None else ""))
    write_results(out, results)
    print(f"wrote {out}")
