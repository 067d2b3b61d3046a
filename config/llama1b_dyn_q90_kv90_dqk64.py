# Table 7: Llama-3.2-1B-Instruct, SVD dynamic delta_q 0.9, delta_kv 0.9, d_qk = d_r = 64 (= d_h:
# allow_qk_overlap)
# python svd_init.py config/llama1b_dyn_q90_kv90_dqk64.py --out_dir=out/llama1b_dyn_q90_kv90_dqk64
# torchrun --nproc_per_node=8 distill.py config/llama1b_dyn_q90_kv90_dqk64.py
from config._distill_llama1b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = None
q_energy = 0.9
kv_energy = 0.9
qk_nope_dim = 64
qk_rope_dim = 64
init = 'svd'
allow_qk_overlap = True
out_dir = "out/llama1b_dyn_q90_kv90_dqk64"
