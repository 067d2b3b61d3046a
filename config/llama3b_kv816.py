# Table 1: Llama-3.2-3B-Instruct, SVD fixed r_q 1536, r_kv 816, d_qk = d_r = 64, KV 43.0% (model card)
# python svd_init.py config/llama3b_kv816.py --out_dir=out/llama3b_kv816
# torchrun --nproc_per_node=8 distill.py config/llama3b_kv816.py
from config._distill_llama3b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-3B-Instruct'
mla_layers = None
q_rank = 1536
kv_rank = 816
qk_nope_dim = 64
qk_rope_dim = 64
init = 'svd'
out_dir = "out/llama3b_kv816"
