# Tables 2, 6: Llama-3.2-1B-Instruct, r_q 1344, r_kv 128, d_qk = d_r = 32, KV 15.6%
# python svd_init.py config/llama1b_kv128.py --out_dir=out/llama1b_kv128
# torchrun --nproc_per_node=8 distill.py config/llama1b_kv128.py
from config._distill_llama1b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = None
q_rank = 1344
kv_rank = 128
qk_nope_dim = 32
qk_rope_dim = 32
init = 'svd'
out_dir = "out/llama1b_kv128"
