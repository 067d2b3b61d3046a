"""
The ablation table of docs/training.md at tiny scale: distill config/tiny_kv8.py under the paper's ablations, the
same token budget for every row, and print held-out KL(teacher || student) and losses as a markdown table.

    python scripts/tiny_ablation.py                  # 2 processes per run (torchrun), about 3 minutes a row
    python scripts/tiny_ablation.py --nproc=1        # one process per run
    python scripts/tiny_ablation.py --only=rorope    # only the rows whose name contains one of these (comma list)
    python scripts/tiny_ablation.py --help

Rows: the rorope init (the default) vs Algorithm 1's SVD vs random init (paper Table 1), KL vs CE vs KL+CE
(Table 3), with vs without latent norms (Table 4; at 1 or calibrated), fixed vs dynamic ranks (Tables 1, 7).
"""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import configure, require  # noqa: E402
from folders import run_child  # noqa: E402

ALG1 = ["--init=svd", "--q_rank=240", "--qk_nope_dim=16"]  # the paper's Algorithm 1 at the same cache
ROWS = [
    ("rorope init, r_kv 8, d_r 16, KL (the default)", []),
    ("rorope init, kv_budget=144 (d_r and per-layer r_kv chosen)", ["--kv_rank=None", "--qk_rope_dim=None",
                                                                    "--kv_budget=144"]),
    ("SVD init (Algorithm 1), fixed r_kv 8, KL", ALG1),
    ("random init, fixed r_kv 8, KL", ["--init=random", "--q_rank=240", "--qk_nope_dim=16"]),
    ("SVD init, CE only", ALG1 + ["--kl_weight=0.0", "--ce_weight=1.0"]),
    ("SVD init, CE + 0.1 KL", ALG1 + ["--kl_weight=0.1", "--ce_weight=1.0"]),
    ("SVD init, latent norms on c_q and c_kv at 1", ALG1 + ["--latent_norm=both", "--latent_norm_init=ones"]),
    ("SVD init, latent norms on c_q and c_kv, calibrated", ALG1 + ["--latent_norm=both"]),
    ("rorope init, latent norms on c_q and c_kv at 1", ["--latent_norm=both", "--latent_norm_init=ones"]),
    ("rorope init, latent norms on c_q and c_kv, calibrated", ["--latent_norm=both"]),
    ("rorope init, latent norm on c_kv, calibrated (what serving needs)", ["--latent_norm=kv"]),
    ("SVD init, dynamic r_kv (δ_kv = 0.4: about the same cache)", ALG1 + ["--kv_rank=None", "--kv_energy=0.4"]),
]


nproc = 2                  # processes per run (torchrun); 1: plain python
only = ""                  # comma list: only the rows whose name contains one of these
out_root = "out/ablation"  # each row distills into out_root/<row name> (distill.py's out_dir rules apply)
configure(globals())
require(globals(), nproc=(1, None))


def main():
    print("| setting | KV cache | held-out KL at init | KL at end | student loss at end | teacher loss |")
    print("|---|---|---|---|---|---|")
    wanted = [o for o in only.split(",") if o]
    for name, extra in ROWS:
        if wanted and not any(o in name for o in wanted):
            continue
        # a row's earlier run is moved aside by distill.py itself (replaced-<time>/); a folder holding anything else
        # is refused there, so nothing a user put in out_root is ever deleted
        out = os.path.join(ROOT, out_root, re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={nproc}"]
        r = run_child(launcher + ["distill.py", "config/tiny_kv8.py", f"--out_dir={out}", *extra], cwd=ROOT,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            print(f"| {name} | failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode} |")
            continue
        evals = [json.loads(line) for line in open(os.path.join(out, "distill.jsonl")) if '"eval"' in line]
        kv = re.search(r"KV cache: (\d+) vs (\d+) numbers per token \(([\d.]+)%", r.stdout)
        first, last = evals[0], evals[-1]
        print(f"| {name} | {kv.group(3)}% | {first['kl']:.3f} | {last['kl']:.3f} | {last['student_ce']:.3f} | "
              f"{last['teacher_ce']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
