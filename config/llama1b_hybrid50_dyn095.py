# Table 8: Llama-3.2-1B-Instruct, MLA in layers 1,3,5,7,8,10,12,14, SVD dynamic delta 0.95, KV 78%
# python svd_init.py config/llama1b_hybrid50_dyn095.py --out_dir=out/llama1b_hybrid50_dyn095
# torchrun --nproc_per_node=8 distill.py config/llama1b_hybrid50_dyn095.py
from config._distill_llama1b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = [1, 3, 5, 7, 8, 10, 12, 14]
q_energy = 0.95
kv_energy = 0.95
qk_nope_dim = 32
qk_rope_dim = 32
init = 'svd'
out_dir = "out/llama1b_hybrid50_dyn095"
