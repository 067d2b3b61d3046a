"""
What a shared key of unscaled frequencies only costs a Llama 3 source at init (issue 37). A random-weight model with
Llama-3.2-1B's attention shape and rotary (d 2048, 32 heads, 8 KV heads, d_h 64, theta 500000, Llama 3 scaling factor
32 over 8192 positions: 15 of its 32 frequencies unscaled), converted by init="rorope" with the key left free
(rope_unscaled=False: the student is exact only where the engine computes Llama 3's scaling, transformers) and with
unscaled frequencies only (rope_unscaled=True: no rope_scaling in the export, the same function in vLLM and SGLang),
under kv_budget and at vLLM's head size 576; KL(teacher || student) per token at init on held-out random ids.

    python scripts/unscaled_trade.py                                  # 4 layers, ~10 minutes on 2 CPU cores
    python scripts/unscaled_trade.py --n_layers=2 "--budgets=[0.25]"  # quicker

Random weights are drawn at unit activation scale (std d^-1/2, so attention is not uniform) and the ids are random:
the numbers say what the constraint costs this factorisation on such a model, not what it costs a trained one.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, require  # noqa: E402
from folders import check_results_file, write_results_file  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from svd_init import kl_per_token, unscaled_count, upcycle  # noqa: E402

n_layers = 4
vocab_size = 4096
intermediate_size = 2048   # narrower than Llama-3.2-1B's 8192: the MLPs do not change the attention's factorisation
budgets = [0.25, 0.125]
head_sizes = [576]         # vLLM's; r_kv 512 and d_r 64 (free) or 16 (unscaled, zero-padded to 64 at export)
calib_tokens = 4096
seq_len = 512
held_out = 4               # held-out sequences of seq_len random ids
seed = 0
out = "results/unscaled_trade.json"
config = configure(globals())
require(config, n_layers=(1, None), calib_tokens=(seq_len, None), held_out=(1, None))
check_results_file(out)  # never over a file this project did not write; refused before the work

cfg = ModelConfig(vocab_size=vocab_size, dim=2048, n_layers=n_layers, n_heads=32, n_kv_heads=8, head_dim=64,
                  intermediate_size=intermediate_size, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                  rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192))
torch.manual_seed(seed)
teacher = Transformer(cfg).eval()
with torch.no_grad():
    for name, p in teacher.named_parameters():
        if p.dim() == 2:
            p.normal_(0, p.shape[1] ** -0.5)
g = torch.Generator().manual_seed(seed)
calib = torch.randint(0, vocab_size, (calib_tokens // seq_len, seq_len), generator=g)
ids = torch.randint(0, vocab_size, (held_out, seq_len), generator=g)
print(f"{n_layers} layers, {unscaled_count(cfg)} of {cfg.head_dim // 2} frequencies unscaled; calibration "
      f"{calib.numel()} random ids, held-out {ids.numel()}")
rows = []
for how in [dict(kv_budget=b) for b in budgets] + [dict(head_size=h, latent_norm="kv") for h in head_sizes]:
    for unscaled in (False, True):
        t0 = time.time()
        s = upcycle(teacher, init="rorope", calib=calib, rope_unscaled=unscaled, **how).eval()
        kl, _ = kl_per_token(teacher, s, ids)
        c = s.config
        rows.append(dict(**how, rope_unscaled=unscaled, kl=kl, r_kv=sorted(set(c.kv_rank)), d_r=c.qk_rope_dim,
                         rope_fold=c.rope_fold, seconds=time.time() - t0))
        print(json.dumps(rows[-1]), flush=True)
write_results_file(out, dict(config=config, rows=rows, torch=torch.__version__, threads=torch.get_num_threads()),
                   "scripts/unscaled_trade.py")
print(f"wrote {out}")
