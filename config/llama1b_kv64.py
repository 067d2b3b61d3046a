# Table 2: Llama-3.2-1B-Instruct, r_q 1424, r_kv 64, d_qk = d_r = 32, KV 9.4% (the official code's default)
# python svd_init.py config/llama1b_kv64.py --out_dir=out/llama1b_kv64
# torchrun --nproc_per_node=8 distill.py config/llama1b_kv64.py
from config._distill_llama1b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = None
q_rank = 1424
kv_rank = 64
qk_nope_dim = 32
qk_rope_dim = 32
init = 'svd'
out_dir = "out/llama1b_kv64"
