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

Everything after `--` goes to TransMLA's converter as its own arguments (its README lists them). A --model-path that
transformers 5 wrote (rope_theta inside rope_parameters, tokenizer_class TokenizersBackend) is handed to TransMLA's
transformers 4.52 through a temporary folder of links with those two fields written the old way: otherwise 4.52
silently rotates at theta 10000, or cannot load the tokenizer. It runs in the
clone's transmla/ folder (its modify_config reads files relative to it): give it absolute paths.
"""
import atexit
import json
import os
import runpy
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402  (plain Python: it runs in TransMLA's venv too)
from errors import BadInput  # noqa: E402

def readable_by_transformers_4(folder, work):
    """TransMLA pins transformers 4.52, which misreads a folder that transformers 5 wrote: its rope_theta sits in
    "rope_parameters" (4.52 would silently use 10000), and tokenizer_class "TokenizersBackend" does not exist there.
    -> `folder`, or a folder in `work` of links to its files with those two fields written the old way."""
    cfg = json.load(open(os.path.join(folder, "config.json")))
    tok_path = os.path.join(folder, "tokenizer_config.json")
    tok = json.load(open(tok_path)) if os.path.exists(tok_path) else {}
    rp = cfg.get("rope_parameters") or {}
    if "rope_theta" in cfg and tok.get("tokenizer_class") != "TokenizersBackend":
        return folder
    if rp.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rp
    cfg["rope_theta"] = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
    out = os.path.join(work, "model")
    os.makedirs(out)
    for name in os.listdir(folder):
        if name not in ("config.json", "tokenizer_config.json"):
            os.symlink(os.path.join(os.path.abspath(folder), name), os.path.join(out, name))
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    if tok:
        json.dump(tok, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
    print(f"run_transmla: {folder} was written by transformers 5; TransMLA reads it through {out} (rope_theta "
          f"{cfg['rope_theta']}, the tokenizer as PreTrainedTokenizerFast)")
    return out


if __name__ == "__main__":
    argv = sys.argv[1:]
    theirs = argv[argv.index("--") + 1:] if "--" in argv else []
    sys.argv = sys.argv[:1] + (argv[:argv.index("--")] if "--" in argv else argv)
    repo = ""                  # a clone of github.com/fxmeng/TransMLA
    calib = ""                 # the calibration text, one {"text": ...} per line (init_ablation.py --write_calib)
    configure(globals())
    if not repo or not calib:
        raise BadInput("run_transmla.py needs --repo=TRANSMLA_CLONE --calib=CALIB.jsonl -- CONVERTER ARGUMENTS")
    repo, calib = os.path.abspath(repo), os.path.abspath(calib)
    src = os.path.join(repo, "transmla", "transmla")
    if not os.path.isfile(os.path.join(src, "converter.py")):
        raise BadInput(f"{src}/converter.py not found. Fix: --repo= a clone of github.com/fxmeng/TransMLA")
    if not os.path.isfile(calib):
        raise BadInput(f"calib={calib} is not a file. Fix: python scripts/init_ablation.py ... --write_calib={calib}")
    import datasets
    sys.path.insert(0, src)
    import utils  # TransMLA's utils.py
    texts = [json.loads(line)["text"] for line in open(calib)]

    def get_dataset(name):
        print(f"run_transmla: calibration = {len(texts)} sequences of {calib} (instead of {name!r})")
        ds = datasets.Dataset.from_dict({"text": texts})
        return datasets.DatasetDict({"train": ds, "test": ds, "validation": ds})

    utils.get_dataset = get_dataset
    work = tempfile.mkdtemp(prefix="run_transmla-")  # links only; removed at exit
    atexit.register(shutil.rmtree, work, True)
    if "--model-path" in theirs:
        at = theirs.index("--model-path") + 1
        theirs[at] = readable_by_transformers_4(os.path.abspath(theirs[at]), work)
    sys.argv = [os.path.join(src, "converter.py")] + theirs
    os.chdir(os.path.join(repo, "transmla"))  # its modify_config reads transmla/transformers/... from there
    runpy.run_path(sys.argv[0], run_name="__main__")
