# Table 1: Llama-3.2-3B-Instruct, SVD dynamic delta 0.95, KV 43%. delta_q is not given; we use delta_q =
# delta_kv
# python svd_init.py config/llama3b_dyn095.py --out_dir=out/llama3b_dyn095
# torchrun --nproc_per_node=8 distill.py config/llama3b_dyn095.py
from config._distill_llama3b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-3B-Instruct'
mla_layers = None
q_energy = 0.95
kv_energy = 0.95
qk_nope_dim = 64
qk_rope_dim = 64
init = 'svd'
out_dir = "out/llama3b_dyn095"
