# Tables 1, 8: Llama-3.2-1B-Instruct, random init, r_q 864, r_kv 512, KV 53.1%
# python svd_init.py config/llama1b_random_kv512.py --out_dir=out/llama1b_random_kv512
# torchrun --nproc_per_node=8 distill.py config/llama1b_random_kv512.py
from config._distill_llama1b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = None
q_rank = 864
kv_rank = 512
qk_nope_dim = 32
qk_rope_dim = 32
init = 'random'
out_dir = "out/llama1b_random_kv512"
