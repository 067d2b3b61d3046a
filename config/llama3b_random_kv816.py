# Table 1: Llama-3.2-3B-Instruct, random init, r_kv 816, KV 43% (r_q 1536 from the X-EcoMLA-3B3B model card)
# python svd_init.py config/llama3b_random_kv816.py --out_dir=out/llama3b_random_kv816
# torchrun --nproc_per_node=8 distill.py config/llama3b_random_kv816.py
from config._distill_llama3b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-3B-Instruct'
mla_layers = None
q_rank = 1536
kv_rank = 816
qk_nope_dim = 64
qk_rope_dim = 64
init = 'random'
out_dir = "out/llama3b_random_kv816"
