# Tables 1, 2, 6, 8: Llama-3.2-1B-Instruct, SVD fixed r_q 864, r_kv 512, d_qk = d_r = 32, KV 53.1%
# python svd_init.py config/llama1b_kv512.py --out_dir=out/llama1b_kv512
# torchrun --nproc_per_node=8 distill.py config/llama1b_kv512.py
from config._distill_llama1b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = None
q_rank = 864
kv_rank = 512
qk_nope_dim = 32
qk_rope_dim = 32
init = 'svd'
out_dir = "out/llama1b_kv512"
