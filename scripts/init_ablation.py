"""
The initialisation table of docs/init.md: KL(teacher || student) and the student's CE at init, before any training, at
100 / 50 / 25 / 12.5% of the source's KV cache: Algorithm 1, then each ingredient of init="rorope" added in turn,
then the whole; and the whole at 50% against the calibration size.

    python scripts/init_ablation.py --model=assets/models/tiny_teacher             # the tiny teacher, ~1 minute
    python scripts/init_ablation.py --model=PATH/SmolLM2-135M-Instruct             # ~27 minutes on 2 CPU cores
    python scripts/init_ablation.py --model=DIR --budgets=[0.5] "--calib_sizes=[]"     # one column, no size rows
    python scripts/init_ablation.py --model=DIR "--budgets=[]" "--calib_sizes=[]" --norms=True   # latent norms only
    python scripts/init_ablation.py --model=DIR "--budgets=[]" "--calib_sizes=[]" "--others=['A', 'B']"  # others
    python scripts/init_ablation.py --model=DIR "--budgets=[]" "--calib_sizes=[]" --write_calib=out/calib.jsonl

Side by side with other converters: --write_calib writes this script's calibration sequences as text (one JSON row
{"text": ...} per sequence, decoded from the same ids), for a converter that takes its own text (scripts/
run_transmla.py feeds it to TransMLA's); --others scores any folder from_pretrained reads (TransMLA's DeepSeek-style
output, a DeepSeek-V3 export) on the same held-out tokens, with its cache.

Held-out text: the first 8 packed sequences of 512 tokens of the bundled C4 sample (assets/data/corpus/c4_demo.jsonl,
never used for calibration). Calibration (8192 tokens unless said otherwise), two protocols:
    --calib_text=sft            B: a seeded choice of 512-token sequences of the bundled SFT mix (the train split
                                distill.py reads): calibration on other text than is scored
    --calib_text=held_out_file  A: consecutive sequences of the held-out file from sequence held_out_seqs + 1 on
                                (token-disjoint from the scored ones): calibration on the kind of text scored
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, require  # noqa: E402
from errors import BadInput  # noqa: E402
from folders import check_rows_file, check_writable, resolve_checkpoint  # noqa: E402
from data import BUNDLED_SFT, PackedData, build_cache, calibration_ids  # noqa: E402
from model import Transformer  # noqa: E402
from ops import token_kl  # noqa: E402
from svd_init import upcycle  # noqa: E402
from tokenizer import Tokenizer, check_tokenizer_for  # noqa: E402

model = "assets/models/tiny_teacher"
budgets = [1.0, 0.5, 0.25, 0.125]
calib_sizes = [1024, 8192, 32768]  # the size rows (the whole init at 50%)
calib_tokens = 8192
calib_seq_len = 512
sft_data = list(BUNDLED_SFT)
held_out = "assets/data/corpus/c4_demo.jsonl"
held_out_seqs = 8
calib_text = "sft"         # "sft": the SFT mix (calibration B); "held_out_file": other sequences of the held-out
                           # file, from sequence held_out_seqs + 1 on (calibration A: the kind of text evaluated)
rope_fold: int | None = None  # the whole init's fold (None: chosen under the budget; 1: no frequency folding)
data_cache = "out/data_cache"
seed = 0
norms = False              # also the latent-norm table: the whole init at 50% with latent_norm kv / both
out = ""                   # also write the rows as JSON lines here
whole_only = False         # only the last row (the whole init) at each budget: the side-by-side column
pick: list = []            # or only these rows, by number (0: Algorithm 1 ... 7: the whole); [] = all
others: list = []          # other converters' student folders, scored on the same held-out tokens
write_calib = ""           # write the calibration sequences as text (JSON lines) for another converter, then go on
config = configure(globals())
require(config, calib_tokens=(1, None), calib_seq_len=(2, None), held_out_seqs=(1, None), seed=(0, None))
N_ROWS = 8  # the rows of the table below
if pick and (whole_only or not all(isinstance(i, int) and 0 <= i < N_ROWS for i in pick)):
    raise BadInput(f"pick={pick!r}: row numbers in [0, {N_ROWS}) (0: Algorithm 1, {N_ROWS - 1}: the whole), "
                   "without whole_only")
if calib_text not in ("sft", "held_out_file"):
    raise BadInput(f"calib_text={calib_text!r}: use 'sft' (the SFT mix) or 'held_out_file' (other sequences of "
                   "the held-out file)")
if any(not 0 < b <= 1 for b in budgets) or any(n < 1 for n in calib_sizes):
    raise BadInput(f"budgets={budgets} / calib_sizes={calib_sizes}: budgets are fractions of the cache in (0, 1], "
                   "calibration sizes token counts >= 1. Fix: e.g. --budgets=[0.5,0.25] --calib_sizes=[8192]")
if write_calib and os.path.exists(write_calib):  # never over a file this script did not write
    raise BadInput(f"write_calib={write_calib} exists. Fix: remove it, or choose another path")
if write_calib:
    check_writable(write_calib)  # before the calibration is built, not after
if out:
    check_rows_file(out, ["model", "kl"])  # appended to: it must be this script's own rows file

teacher = Transformer.from_pretrained(model).eval()
cfg = teacher.config
tok = Tokenizer.from_name("", model)
quiet = lambda *a: None
held = PackedData(build_cache([held_out], tok, data_cache, 10**9, log=quiet), "train", 512)
x, y = held.get(range(held_out_seqs))


def calibration(n_tokens):
    """Calibration B: a seeded choice from the SFT mix; A: consecutive sequences of the held-out file after the
    held-out ones, one sequence's gap between (token-disjoint from what is scored)."""
    if calib_text == "sft":
        return calibration_ids(sft_data, tok, data_cache, n_tokens, calib_seq_len, seed, log=quiet)
    pack = PackedData(build_cache([held_out], tok, data_cache, 10**9, log=quiet), "train", calib_seq_len)
    first = -(-(held_out_seqs + 1) * 512 // calib_seq_len)
    n = -(-n_tokens // calib_seq_len)
    if first + n > pack.n_seq:
        raise BadInput(f"calib_text='held_out_file' needs {n} sequences of {calib_seq_len} tokens after the held-out "
                       f"ones; {held_out} holds {pack.n_seq - first}. Fix: fewer calib_tokens")
    return pack.get(range(first, first + n))[0]


calib = calibration(calib_tokens)
d_h, src = cfg.head_dim, 2 * cfg.n_kv_heads * cfg.head_dim
cap = min(cfg.dim, src)


@torch.no_grad()
def measure(student):
    lt, ls = teacher(x).float().log_softmax(-1), student(x).float().log_softmax(-1)
    return token_kl(lt, ls).mean().item(), -ls.gather(-1, y[..., None]).mean().item()


_, ce_t = measure(teacher)
if write_calib:
    with open(write_calib, "x") as f:
        for row in calib.tolist():
            f.write(json.dumps({"text": tok.decode(row)}) + "\n")
    print(f"wrote {write_calib}: {calib.shape[0]} calibration sequences of {calib.shape[1]} tokens as text")
for folder in others:  # checked before any is scored: the same tokenizer, or the KL compares different texts
    check_tokenizer_for(tok, resolve_checkpoint(folder), "other converter's model")
for folder in others:
    other = Transformer.from_pretrained(folder).eval()
    kl, ce = measure(other)
    pct = 100 * other.kv_cache_elements_per_token() / teacher.kv_cache_elements_per_token()
    c = other.config
    print(f"  {folder}: KL {kl:.3f} CE {ce:.3f} cache {pct:.1f}% (r_kv {min(c.kv_rank)}-{max(c.kv_rank)}, d_r "
          f"{c.qk_rope_dim}, latent norm {c.latent_norm})", flush=True)
    if out:
        with open(out, "a") as sink:
            sink.write(json.dumps(dict(model=model, other=folder, kl=kl, ce=ce, cache_pct=pct)) + "\n")
print(f"{model}: held-out {held_out_seqs} x 512 tokens of {held_out}; teacher CE {ce_t:.3f}; calibration "
      f"{calib.numel()} tokens of " + (f"the SFT mix (seed {seed})" if calib_text == "sft" else f"{held_out} after the "
      "held-out sequences") + f"; {torch.get_num_threads()} threads")
r_d = d_h // 2  # Algorithm 1's d_qk = d_r = d_h / 2, and the fixed-d_r rows
rows = [("Algorithm 1 (init=svd, d_qk = d_r = d_h/2)", lambda b: dict(init="svd", kv_rank=min(b - r_d, cap))),
        ("+ RoRoPE shared key (d_qk = d_h), plain SVD", lambda b: dict(init="rorope", kv_rank=min(b - r_d, cap),
                                                                       qk_rope_dim=r_d, whiten=False,
                                                                       weight_errors=False)),
        ("+ whitened SVD, C-weighted up-projection", lambda b: dict(init="rorope", kv_rank=min(b - r_d, cap),
                                                                     qk_rope_dim=r_d, weight_errors=False)),
        ("+ key/value errors weighted by their cost", lambda b: dict(init="rorope", kv_rank=min(b - r_d, cap),
                                                                      qk_rope_dim=r_d, weight_errors=True)),
        ("+ budget: d_r and per-layer r_kv chosen", lambda b: dict(init="rorope", kv_budget=None, rope_fold=1,
                                                                    weight_errors=True, refit=False)),
        ("+ frequency folding, chosen beside d_r", lambda b: dict(init="rorope", kv_budget=None, rope_fold=rope_fold,
                                                                   weight_errors=True, refit=False)),
        ("+ with or without the cost weights, chosen", lambda b: dict(init="rorope", kv_budget=None,
                                                                       rope_fold=rope_fold, refit=False)),
        ("+ W_UV, W_O refitted to the teacher's outputs (the whole)", lambda b: dict(init="rorope", kv_budget=None,
                                                                                      rope_fold=rope_fold))]
assert len(rows) == N_ROWS
rows = rows[-1:] if whole_only else [rows[i] for i in sorted(set(pick))] if pick else rows
results = {}
sink = open(out, "a") if out else None
for frac in budgets:
    per_layer = int(frac * src)
    for name, make in rows:
        kw = make(per_layer)
        if "kv_budget" in kw:
            kw["kv_budget"] = frac
        elif kw["kv_rank"] < 1:
            results[name, frac] = "n/a"
            continue
        t0 = time.time()
        student = upcycle(teacher, calib=calib, **kw).eval()
        kl, ce = measure(student)
        pct = 100 * student.kv_cache_elements_per_token() / teacher.kv_cache_elements_per_token()
        c = student.config
        note = (f"d_r {c.qk_rope_dim}, r_kv {min(c.kv_rank)}-{max(c.kv_rank)}, fold {c.rope_fold}" if "kv_budget" in kw
                else "")
        results[name, frac] = f"{kl:.3f} / {ce:.2f}"
        print(f"  {frac:.3f} {name}: KL {kl:.3f} CE {ce:.3f} cache {pct:.1f}% {note} ({time.time() - t0:.0f} s)",
              flush=True)
        if sink:
            sink.write(json.dumps(dict(model=model, budget=frac, row=name, kl=kl, ce=ce, cache_pct=pct, note=note,
                                       settings={k: v for k, v in kw.items()}, calib_tokens=calib.numel())) + "\n")
            sink.flush()
if budgets:
    print("\n| init (KL / CE at init) | " + " | ".join(f"{100 * b:g}% cache" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name, _ in rows:
        print(f"| {name} | " + " | ".join(results.get((name, b), "") for b in budgets) + " |")
if calib_sizes:
    print("\n| calibration tokens (the whole init, 50% cache) | KL at init | CE at init |\n|---|---|---|")
    for n in calib_sizes:
        ids = calibration(n)
        kl, ce = measure(upcycle(teacher, calib=ids, init="rorope", kv_budget=0.5).eval())
        print(f"| {ids.numel()} | {kl:.3f} | {ce:.3f} |", flush=True)
if norms:
    # what a serving engine's RMSNorm on c_kv (and c_q) costs at init, by how its weight is set; KL against the
    # teacher and against the same init without norms
    base = upcycle(teacher, calib=calib, init="rorope", kv_budget=0.5).eval()
    kl0, ce0 = measure(base)
    print(f"\n| latent norms (the whole init, 50% cache) | KL at init | CE at init | KL to the no-norm init | time |"
          f"\n|---|---|---|---|---|\n| none | {kl0:.3f} | {ce0:.3f} | 0 | |")
    for kind, how in [("kv", "ones"), ("kv", "scalar"), ("kv", "gain"), ("kv", "diagonal"), ("kv", "calibrated"),
                      ("both", "calibrated")]:
        t0 = time.time()
        student = upcycle(teacher, calib=calib, init="rorope", kv_budget=0.5, latent_norm=kind,
                          latent_norm_init=how).eval()
        dt = time.time() - t0
        kl, ce = measure(student)
        with torch.no_grad():
            lb, ls = base(x).float().log_softmax(-1), student(x).float().log_softmax(-1)
            kl_b = token_kl(lb, ls).mean().item()
        print(f"| {kind}, {how} | {kl:.3f} | {ce:.3f} | {kl_b:.3f} | {dt:.0f} s |", flush=True)
        if sink:
            sink.write(json.dumps(dict(model=model, budget=0.5, latent_norm=kind, latent_norm_init=how, kl=kl, ce=ce,
                                       kl_to_no_norm=kl_b, seconds=dt)) + "\n")
            sink.flush()
