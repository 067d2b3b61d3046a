"""
Run TransMLA's own converter (github.com/fxmeng/TransMLA, transmla/transmla/converter.py) on OUR calibration text,
so its numbers and ours come from the same tokens. Nothing of TransMLA is copied here: this runs its converter.py
from a clone, in its own venv, with one change made from outside: its get_dataset (which downloads wikitext2 / c4
from the hub, unreachable here) returns the text file that `scripts/init_ablation.py --write_calib=` wrote.

    git clone https://github.com/fxmeng/TransMLA /tmp/TransMLA
    python3 -m venv ~/venvs/transmla && ~/venvs/transmla/bin/pip install torch==2.13.0 && ~/venvs/transmla/bin/pip \
        install transformers==4.52.4 datasets accelerate safetensors sentencepiece tqdm
    python scripts/init_ablation.py --model=DIR "--budgets=[]" "--calib_sizes=[]" --write_calib=out/calib.jsonl
    ~/venvs/transmla/bin/python scripts/run_transmla.py --repo=/tmp/TransMLA --calib=out/calib.jsonl -- \
        --model-path DIR --save-path out/transmla-128 --dtype fp32 --device cpu --cal-nsamples 16 \
        --cal-max-seqlen 512 --cal-batch-size 4 --ppl-eval-batch-size 0 --freqfold 4 --collapse auto \
        --qk-mqa-dim 64 --kv-lora-rank 128 --deepseek-style
    python scripts/init_ablation.py --model=DIR "--budgets=[]" "--calib_sizes=[]" "--others=['out/transmla-128']"

Everything after `--` goes to TransMLA's converter as its own arguments (its README lists them). It runs in the
clone's transmla/ folder (its modify_config reads files relative to it): give it absolute paths.
"""
import json
import os
import runpy
import sys

if __name__ == "__main__":
    ours, theirs = sys.argv[1:], []
    if "--" in ours:
        i = ours.index("--")
        ours, theirs = ours[:i], ours[i + 1:]
    opts = dict(a[2:].split("=", 1) for a in ours if a.startswith("--") and "=" in a)
    if set(opts) - {"repo", "calib"} or "repo" not in opts or "calib" not in opts:
        sys.exit("usage: run_transmla.py --repo=TRANSMLA_CLONE --calib=CALIB.jsonl -- CONVERTER ARGUMENTS")
    opts = {k: os.path.abspath(v) for k, v in opts.items()}
    src = os.path.join(opts["repo"], "transmla", "transmla")
    if not os.path.isfile(os.path.join(src, "converter.py")):
        sys.exit(f"error: {src}/converter.py not found. Fix: --repo= a clone of github.com/fxmeng/TransMLA")
    import datasets
    sys.path.insert(0, src)
    import utils  # TransMLA's utils.py
    texts = [json.loads(line)["text"] for line in open(opts["calib"])]

    def get_dataset(name):
        print(f"run_transmla: calibration = {len(texts)} sequences of {opts['calib']} (instead of {name!r})")
        ds = datasets.Dataset.from_dict({"text": texts})
        return datasets.DatasetDict({"train": ds, "test": ds, "validation": ds})

    utils.get_dataset = get_dataset
    sys.argv = [os.path.join(src, "converter.py")] + theirs
    os.chdir(os.path.join(opts["repo"], "transmla"))  # its modify_config reads transmla/transformers/... from there
    runpy.run_path(sys.argv[0], run_name="__main__")
