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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402  (plain Python: it runs in TransMLA's venv too)

if __name__ == "__main__":
    argv = sys.argv[1:]
    theirs = argv[argv.index("--") + 1:] if "--" in argv else []
    sys.argv = sys.argv[:1] + (argv[:argv.index("--")] if "--" in argv else argv)
    repo = ""                  # a clone of github.com/fxmeng/TransMLA
    calib = ""                 # the calibration text, one {"text": ...} per line (init_ablation.py --write_calib)
    configure(globals())
    if not repo or not calib:
        raise ValueError("run_transmla.py needs --repo=TRANSMLA_CLONE --calib=CALIB.jsonl -- CONVERTER ARGUMENTS")
    repo, calib = os.path.abspath(repo), os.path.abspath(calib)
    src = os.path.join(repo, "transmla", "transmla")
    if not os.path.isfile(os.path.join(src, "converter.py")):
        raise ValueError(f"{src}/converter.py not found. Fix: --repo= a clone of github.com/fxmeng/TransMLA")
    if not os.path.isfile(calib):
        raise ValueError(f"calib={calib} is not a file. Fix: python scripts/init_ablation.py ... --write_calib={calib}")
    import datasets
    sys.path.insert(0, src)
    import utils  # TransMLA's utils.py
    texts = [json.loads(line)["text"] for line in open(calib)]

    def get_dataset(name):
        print(f"run_transmla: calibration = {len(texts)} sequences of {calib} (instead of {name!r})")
        ds = datasets.Dataset.from_dict({"text": texts})
        return datasets.DatasetDict({"train": ds, "test": ds, "validation": ds})

    utils.get_dataset = get_dataset
    sys.argv = [os.path.join(src, "converter.py")] + theirs
    os.chdir(os.path.join(repo, "transmla"))  # its modify_config reads transmla/transformers/... from there
    runpy.run_path(sys.argv[0], run_name="__main__")
