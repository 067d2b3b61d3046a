# Table 7: Llama-3.2-1B-Instruct, SVD dynamic delta_q 0.9, delta_kv 0.95, d_qk = d_r = 32
# python svd_init.py config/llama1b_dyn_q90_kv95_dqk32.py --out_dir=out/llama1b_dyn_q90_kv95_dqk32
# torchrun --nproc_per_node=8 distill.py config/llama1b_dyn_q90_kv95_dqk32.py
from config._distill_llama1b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = None
q_energy = 0.9
kv_energy = 0.95
qk_nope_dim = 32
qk_rope_dim = 32
init = 'svd'
out_dir = "out/llama1b_dyn_q90_kv95_dqk32"
