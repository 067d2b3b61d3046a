"""
Two students of one random-weight Llama-3-scaled source, exported at vLLM's head size 576, for serving at long
positions (issue 37): the source has Llama-3.2-1B's attention and rotary (d 2048, 32 heads, 8 KV heads, d_h 64,
theta 500000, Llama 3 scaling factor 32 over 8192 positions), fewer layers and a smaller vocabulary so that a CPU
serves 6K-token prompts in minutes. init="rorope" at head_size 576 (r_kv 512), once with only unscaled frequencies
in the shared key (rope_unscaled=True: d_r 16, zero-padded to 64; the export writes no rope_scaling) and once free
(rope_unscaled=False: d_r 64 with Llama 3's scaling in the export, which vLLM and SGLang serve as DeepSeek-YaRN).

    python scripts/llama3_students.py --out_dir=out/llama3_students     # ~3 minutes on 2 CPU cores
    ~/venvs/vllm/bin/python scripts/serve_check.py --engine=vllm --model=out/llama3_students/unscaled-576 \\
        --prompt_lengths=2300,6200 --max_model_len=8192
    ~/venvs/vllm/bin/python scripts/serve_check.py --engine=vllm --model=out/llama3_students/scaled-576 \\
        --prompt_lengths=2300,6200 --max_model_len=8192

Weights at unit activation scale (std fan_in^-1/2: decisive logits, so greedy tokens mean something); calibration on
random ids. It also prints each student's KL to the source at init on held-out random ids (the trade on this shape).
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, require  # noqa: E402
from folders import check_replaceable, check_results_file, write_results_file  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from svd_init import Conversion, kl_per_token, upcycle  # noqa: E402

out_dir = "out/llama3_students"
n_layers = 2
vocab_size = 8192
intermediate_size = 2048
calib_tokens = 4096
seq_len = 512
seed = 0
config = configure(globals())
require(config, n_layers=(1, None), calib_tokens=(seq_len, None))
for name in ("unscaled-576", "scaled-576"):  # refused now, before any work: never over a folder we did not write
    check_replaceable(os.path.abspath(os.path.join(out_dir, name)))
check_results_file(os.path.join(out_dir, "students.json"))

cfg = ModelConfig(vocab_size=vocab_size, dim=2048, n_layers=n_layers, n_heads=32, n_kv_heads=8, head_dim=64,
                  intermediate_size=intermediate_size, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                  bos_id=None, eos_id=(), rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                            high_freq_factor=4.0, original_max_position_embeddings=8192))
torch.manual_seed(seed)
source = Transformer(cfg).eval()
with torch.no_grad():
    for p in source.parameters():
        if p.dim() == 2:
            p.normal_(0, p.shape[1] ** -0.5)
g = torch.Generator().manual_seed(seed)
calib = torch.randint(0, vocab_size, (calib_tokens // seq_len, seq_len), generator=g)
held = torch.randint(0, vocab_size, (4, seq_len), generator=g)
rows = {}
for name, unscaled in (("unscaled-576", True), ("scaled-576", False)):
    conv = Conversion(init="rorope", head_size=576, latent_norm="kv", rope_unscaled=unscaled)
    student = upcycle(source, conv, calib=calib, copy=False).eval()  # shares the untouched tensors: no 2nd copy
    kl, _ = kl_per_token(source, student, held)
    folder = os.path.join(out_dir, name)
    student.save_pretrained(folder, run_config=config, fmt="deepseek", head_size=576)
    with open(os.path.join(folder, "config.json")) as f:
        scaling = json.load(f).get("rope_scaling")
    rows[name] = dict(d_r=student.config.qk_rope_dim, rope_fold=student.config.rope_fold, kl_at_init=kl,
                      rope_scaling_in_export=scaling)
    print(f"{folder}: r_kv {max(student.config.kv_rank)} + d_r {student.config.qk_rope_dim} (fold "
          f"{student.config.rope_fold}), exported at 512 + 64; rope_scaling in its config.json: {scaling}; KL to the "
          f"source at init {kl:.4f} nats/token on {held.numel()} held-out random ids", flush=True)
write_results_file(os.path.join(out_dir, "students.json"), dict(config=config, students=rows),
                   "scripts/llama3_students.py")
