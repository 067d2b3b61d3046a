"""
Export an all-MLA model of this project as a DeepSeek-V3 folder (deepseek.py: the format) that transformers, vLLM,
SGLang and llama.cpp's converter load as DeepseekV3ForCausalLM with no custom code.

    python svd_init.py --init=rorope --kv_budget=0.5 --latent_norm=kv --out_dir=out/s   # a student to export
    python export.py out/s out/s-deepseek                    # export (CPU)
    python export.py out/s out/s-deepseek --check=True       # + transformers' DeepseekV3 on it; its dtype vs fp32
    python export.py out/s out/s-deepseek --dtype=bfloat16   # halve the folder for serving
    python export.py out/s out/s-576 --head_size=576         # zero-padded to a shape vLLM serves (docs/serving.md)
    python export.py out/s out/s-sg --engine=sglang          # refused where that engine would reject the shape

--check reads the folder back as an engine would: transformers' DeepseekV3 on the export against this project on
the same (rounded) weights, then the export in its own dtype against the source model in float32 (top-1 agreement
and KL on text the model writes itself), and fails loudly where the export is not the model.
"""
import os

import torch

from configurator import configure
from deepseek import cache_line, compare_with_transformers, engine_problem, engine_shape, export_config
from errors import BadInput
from folders import check_apart, check_not_in_a_live_run, check_replaceable, resolve_checkpoint
from model import Transformer, resolve_dtype
from ops import kl_and_agreement
from tokenizer import Tokenizer

init_from = ""             # our MLA model folder (or hub id) to export
out_dir = ""               # the DeepSeek-V3 folder to write (new or empty, or one this project wrote)
dtype = ""                 # "" keeps the checkpoint's; "bfloat16" halves the folder (engines serve bf16)
check = False              # then run the export as an engine would, in its dtype, against the float32 model
check_max_kl = 0.05        # --check fails above this KL(float32 model || export) per token (bf16: ~1e-3)
head_size = 0              # 0: the model's own r_kv + d_r; 320 / 512 / 576: zero-padded to a shape vLLM serves
engine = ""                # "vllm", "vllm-cpu", "sglang", "llama.cpp", "transformers": refuse a shape it rejects;
                           # "": the engine the conversion aimed at (svd_init.py --engine), if any
config = configure(globals(), positional=("init_from", "out_dir"))  # python export.py MODEL_DIR OUT_DIR
if not init_from or not out_dir:
    raise BadInput("export.py needs a model folder and an output folder. Fix: python export.py MODEL_DIR "
                   "OUT_DIR [--dtype=bfloat16] [--check=True] [--head_size=576] [--engine=vllm]")
folder = resolve_checkpoint(init_from)
check_apart(out_dir, "out_dir", {"init_from": folder})  # never over its own source (an MLA folder we wrote)
check_replaceable(os.path.abspath(os.path.expanduser(out_dir)))
check_not_in_a_live_run(out_dir)
model = Transformer.from_pretrained(folder, dtype=resolve_dtype(dtype, "cpu") if dtype else None).eval()
try:
    export_config(model.config, head_size)  # the refusals, before anything is written
except ValueError as e:
    raise BadInput(f"{folder} cannot be exported exactly: {e}") from None
if not engine and (model.config.conversion or {}).get("engine"):  # the engine the conversion aimed at
    engine = model.config.conversion["engine"]
    print(f"engine {engine}: the conversion aimed at it (config.json mla_conversion); --engine=NAME checks another")
if engine and (problem := engine_problem(engine, *engine_shape(model.config, head_size))):
    raise BadInput(problem)
try:
    tok = Tokenizer.from_name("", folder)
except (FileNotFoundError, ValueError):
    tok = None
model.save_pretrained(out_dir, run_config={**config, "format": "deepseek_v3"}, tokenizer=tok, fmt="deepseek",
                      head_size=head_size)
c = model.config
R, D = engine_shape(c, head_size)
print(f"wrote {out_dir}: DeepseekV3ForCausalLM, {c.n_layers} MLA layers, kv_lora_rank {R}, qk_rope_head_dim {D}, "
      f"q_lora_rank {max(c.q_rank) if c.latent_norm == 'both' else 'null (query fused)'}")
print("  " + cache_line(c, head_size))
if check:
    low = model.lm_head.weight.dtype  # the export's own dtype (compare_with_transformers casts the model)
    # 1. the format: transformers computes, from the folder, exactly what we compute from the same (rounded) weights
    try:
        import transformers  # noqa: F401
    except ImportError:
        transformers = None
        print("--check: transformers is not installed, so the export is read back by this project's reader only")
    if transformers is not None:
        err, top = compare_with_transformers(model, out_dir)
        print(f"transformers' DeepseekV3ForCausalLM vs ours, float32, 64 random ids: max |logit difference| "
              f"{err:.2e} (largest logit {top:.1f})")
        if not err <= 1e-4 * max(top, 1.0):
            raise BadInput(f"{out_dir}: transformers computes other logits from the export than this project "
                           f"does ({err:.2e} apart, largest logit {top:.1f}): the export is not the model. "
                           "Please report it, with the source folder's config.json")
    # 2. the numbers: the export in its own dtype, as it is served, against the source model in float32, on
    # text the source writes itself (a low-precision copy of an ill-conditioned model passes step 1 and fails here)
    # the model as read, in float32 (compare_with_transformers cast it); re-read only where --dtype rounded it
    src = Transformer.from_pretrained(folder, dtype=torch.float32).eval() if dtype else model.float()
    start = torch.full((4, 1), src.config.bos_id or 0, dtype=torch.long)
    torch.manual_seed(0)
    ids = src.generate(start, min(127, src.config.max_seq_len - 1), temperature=1.0)
    if transformers is not None:
        eng = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=low).eval()
        out = eng(ids).logits
        who = "transformers' DeepseekV3ForCausalLM"
    else:
        eng = Transformer.from_pretrained(out_dir, dtype=low).eval()
        out = eng(ids)
        who = "this project's reader"
    with torch.no_grad():
        kl, agree = kl_and_agreement(src(ids), out)
    name = str(low).replace("torch.", "")
    print(f"the export in {name} ({who}) vs the model in float32, {ids.numel()} tokens the model wrote: "
          f"KL {kl:.2e} nats/token, top-1 agreement {100 * agree:.1f}%")
    if not kl <= check_max_kl:
        raise BadInput(f"the export in {name} is not the model: KL {kl:.3f} nats/token (> check_max_kl "
                       f"{check_max_kl}), top-1 agreement {100 * agree:.1f}%; it works in float32 only. The "
                       f"folder {out_dir} is written; do not serve it in {name}. Fix: export with "
                       "--dtype=float32, or re-convert with this version's svd_init.py (its latent scales are "
                       "bounded)")
