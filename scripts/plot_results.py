"""
The figures of docs/, drawn from the results files the runs already wrote (nothing is measured here):

    ~/venvs/plot/bin/python scripts/plot_results.py        # matplotlib in its own venv: not a project requirement

    docs/figures/kl_at_init.png   KL(teacher || student) at init against the cache fraction, SmolLM2-135M-Instruct:
                                  Algorithm 1, ours (init="rorope") before and after its refit, TransMLA, under
                                  calibrations A and B
                                  (results/side_by_side_calib{A,B}.jsonl, written by scripts/init_ablation.py --out)
    docs/figures/distill_tiny.png held-out KL during README command one (results/distill_tiny_kv8.jsonl: the run's own
                                  out/tiny_kv8/distill.jsonl, copied)

A file that is missing leaves its figure out (with a line saying so).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from folders import check_only  # noqa: E402

results = "results"
out_dir = "docs/figures"
configure(globals())
check_only(out_dir, [r"kl_at_init\.png", r"distill_tiny\.png"], "out_dir")  # it replaces its own figures only


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finish(ax, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save(fig, name, sources):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    print(f"wrote {os.path.join(out_dir, name)} from {sources}")


import matplotlib  # noqa: E402  (after the settings: --help works without matplotlib)
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

os.makedirs(out_dir, exist_ok=True)
panels = [(c, os.path.join(results, f"side_by_side_calib{c}.jsonl")) for c in "AB"]
panels = [(c, p) for c, p in panels if os.path.exists(p)]
if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (calib, path) in zip(axes[0], panels):
        rs = rows(path)
        series = {
            "Algorithm 1 (paper)": [r for r in rs if r.get("row", "").startswith("Algorithm 1")],
            'ours, before the refit of W_UV, W_O': [r for r in rs if r.get("row", "") ==
                                                    "+ with or without the cost weights, chosen"],
            'ours, init="rorope" (the whole)': [r for r in rs if "(the whole)" in r.get("row", "")],
            "TransMLA (best shape per budget)": [r for r in rs if r.get("other", "").startswith("TransMLA")],
        }
        for (name, rr), style in zip(series.items(), ("s:", "o:", "o-", "^--")):
            best = {}
            for r in rr:  # one point per cache fraction: the best of the shapes measured there
                best[r["cache_pct"]] = min(best.get(r["cache_pct"], float("inf")), r["kl"])
            if best:
                xs = sorted(best)
                ax.plot(xs, [best[x] for x in xs], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks([12.5, 25, 50], ["12.5%", "25%", "50%"])
        finish(ax, "KV cache, % of the source's", "KL(teacher || student) at init, nats/token",
               f"SmolLM2-135M-Instruct, calibration {calib} "
               + ("(C4, the scored kind)" if calib == "A" else "(the SFT mix)"))
    save(fig, "kl_at_init.png", ", ".join(p for _, p in panels))
else:
    print(f"no {results}/side_by_side_calib*.jsonl: kl_at_init.png left out")

path = os.path.join(results, "distill_tiny_kv8.jsonl")
if os.path.exists(path):
    ev = [r for r in rows(path) if r.get("kind") == "eval"]
    tr = [r for r in rows(path) if r.get("kind") == "train"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([r["step"] for r in tr], [r["kl"] for r in tr], ".-", alpha=0.6, label="train KL (interval mean)")
    ax.plot([r["step"] for r in ev], [r["kl"] for r in ev], "o-", label="held-out KL")
    ax.set_yscale("log")
    finish(ax, "optimizer step (8,192 tokens each)", "KL(teacher || student), nats/token",
           "README command one: tiny teacher -> MLA at 9.4% of its cache")
    save(fig, "distill_tiny.png", path)
else:
    print(f"no {path}: distill_tiny.png left out")
