"""
The Zebra-Llama table of docs/zebra.md: hybrids of MLA and Mamba2 layers composed from one model (zebra.py), each taken
through ILD and then the end-to-end KL with distill.py on the same token budget, against an all-MLA student.
Prints KL(teacher || student) per token on distill.py's held-out set at init, after ILD and after the KL, and the
cache each keeps (per token, plus the fixed Mamba2 state, in bytes at 1K / 8K / 32K tokens).

    python scripts/zebra_table.py                                   # the tiny teacher, 2 CPU processes, ~15 min
    python scripts/zebra_table.py --init_from=DIR --kv_rank=160 --qk_rope_dim=32 --seq_len=512 --micro_batch=2 \\
        --tokens_per_step=2048 --ild_steps=8 --e2e_steps=8 --lr_ild=5e-4 --lr_e2e=1e-4 --out_root=out/zebra_smollm2
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from folders import check_only, check_rows_file, run_child  # noqa: E402
from model import Transformer  # noqa: E402

init_from = "assets/models/tiny_teacher"
fractions = [1.0, 0.5, 0.25, 0.125]   # of the layers kept MLA; 1.0 is the all-MLA student
uniform_at = [0.25]        # also the published (uniform) placement at these fractions
no_ild_at = [0.25]         # also the KL alone for ild_steps + e2e_steps at these (sensitivity placement)
kv_rank = 16               # the MLA layers: init rorope at these ranks
qk_rope_dim = 16
conv_init = "identity"
ssm_gain = "calibrated"    # Mamba2's norm weights at init: "calibrated" (ours) or "ones" (published)
tokenizer = "bytes"        # "" for the model folder's own
data_cache = "out/data_cache"
seq_len = 256
micro_batch = 8
tokens_per_step = 8192
ild_steps = 25
e2e_steps = 25
lr_ild = 1e-3
lr_e2e = 3e-4
eval_batches = 4
nproc = 2
out_root = "out/zebra_table"
configure(globals())
# what this script writes under out_root, and nothing else there: rows.jsonl and one folder per row holding its
# hybrid (zebra.py), its ILD and KL runs (distill.py, each with its own out_dir rules) and zebra.py's output
check_only(out_root, [r"rows\.jsonl", r"mla[0-9.]+_(sensitivity|uniform)(_noild)?/"], "out_root")
for _row in os.listdir(out_root) if os.path.isdir(out_root) else []:
    if os.path.isdir(os.path.join(out_root, _row)):
        check_only(os.path.join(out_root, _row), [r"init/", r"ild/", r"e2e/", r"zebra\.txt"], "row folder")
check_rows_file(os.path.join(out_root, "rows.jsonl"), ["name", "kl_e2e"])

PY = sys.executable
env = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(args, n=1):
    out_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--out_dir=")), None)
    if out_dir and os.path.exists(os.path.join(out_dir, "final", "config.json")) and args[0] == "distill.py":
        return "", None  # that stage finished before (a rerun after an interruption)
    launcher = [PY] if n == 1 else [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    t0 = time.time()
    r = run_child(launcher + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout, time.time() - t0


def evals(out_dir):
    with open(os.path.join(out_dir, "distill.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval"]


common = [f"--teacher={init_from}", f"--tokenizer={tokenizer}", f"--data_cache={data_cache}", f"--seq_len={seq_len}",
          f"--micro_batch={micro_batch}", f"--tokens_per_step={tokens_per_step}", f"--eval_batches={eval_batches}",
          "--eval_every=1000", "--log_every=5", "--ckpt_every=1000", "--warmup_frac=0.1"]
variants = [(f, "sensitivity", True) for f in fractions] + [(f, "uniform", True) for f in uniform_at] + \
           [(f, "sensitivity", False) for f in no_ild_at]
src = Transformer.from_pretrained(init_from)  # its cache is each row's reference
rows, done_file = [], os.path.join(out_root, "rows.jsonl")
done = {r["name"]: r for r in map(json.loads, open(done_file))} if os.path.exists(done_file) else {}
for frac, placement, with_ild in variants:
    name = f"mla{frac:g}_{placement}" + ("" if with_ild else "_noild")
    if name in done:  # rerunning the script continues where it stopped
        rows.append(done[name])
        continue
    root = os.path.join(out_root, name)
    hybrid = os.path.join(root, "init")
    if not os.path.exists(os.path.join(hybrid, "config.json")):
        out, _ = run(["zebra.py", f"--init_from={init_from}", f"--out_dir={hybrid}", f"--mla_fraction={frac}",
                      f"--placement={placement}", f"--kv_rank={kv_rank}", f"--qk_rope_dim={qk_rope_dim}",
                      f"--conv_init={conv_init}", f"--ssm_gain={ssm_gain}", f"--tokenizer={tokenizer}",
                      f"--data_cache={data_cache}"])
        with open(os.path.join(root, "zebra.txt"), "w") as f:  # sensitivities, layers, KL at init, cache
            f.write(out)
        print(next(l for l in out.splitlines() if l.startswith("MLA layers")), flush=True)
    t = {}
    if with_ild:
        _, t["ild"] = run(["distill.py", f"--student_from={hybrid}", "--ild=True", f"--max_steps={ild_steps}",
                           f"--lr={lr_ild}", f"--out_dir={root}/ild"] + common, nproc)
        ev_ild = evals(f"{root}/ild")
        start, steps = f"{root}/ild/final", e2e_steps
    else:
        start, steps = hybrid, ild_steps + e2e_steps
    _, t["e2e"] = run(["distill.py", f"--student_from={start}", f"--max_steps={steps}", f"--lr={lr_e2e}",
                       f"--out_dir={root}/e2e"] + common, nproc)
    ev_e2e = evals(f"{root}/e2e")
    m = Transformer.from_pretrained(f"{root}/e2e/final")
    rows.append(dict(name=name, mla=list(m.config.mla_layers), n_mamba=len(m.config.mamba_layers),
                     per_token=m.kv_cache_elements_per_token(), src_per_token=src.kv_cache_elements_per_token(),
                     state=m.state_bytes(1), bytes={str(T): m.kv_cache_bytes(1, T) for T in (1024, 8192, 32768)},
                     src_bytes={str(T): src.kv_cache_bytes(1, T) for T in (1024, 8192, 32768)},
                     kl_init=(ev_ild if with_ild else ev_e2e)[0]["kl"], kl_ild=ev_ild[-1]["kl"] if with_ild else None,
                     kl_e2e=ev_e2e[-1]["kl"], seconds=t))
    r = rows[-1]
    print(json.dumps(r), flush=True)
    with open(done_file, "a") as f:
        f.write(json.dumps(r) + "\n")

tok = ild_steps * tokens_per_step
print(f"\n{init_from}: ILD {ild_steps} x {tokens_per_step} tokens (lr {lr_ild}), then KL {e2e_steps} x "
      f"{tokens_per_step} (lr {lr_e2e}); held-out KL(teacher || student) per token")
print("| student | MLA layers | Mamba2 | cache/token (% GQA) | fixed state | cache at 1K / 8K / 32K (% GQA) | KL init "
      "| after ILD | after KL |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    pct = " / ".join(f"{r['bytes'][T] / 2**20:.2f} MiB ({100 * r['bytes'][T] / r['src_bytes'][T]:.1f}%)"
                     for T in ("1024", "8192", "32768"))
    ild = f"{r['kl_ild']:.3f}" if r["kl_ild"] is not None else f"(no ILD; KL for {2 * tok // 1000}K tokens)"
    share = 100 * r["per_token"] / r["src_per_token"]
    print(f"| {r['name']} | {r['mla']} | {r['n_mamba']} | {r['per_token']} ({share:.1f}%) "
          f"| {r['state'] / 1024:.1f} KiB | {pct} | {r['kl_init']:.3f} | {ild} | {r['kl_e2e']:.3f} |")
