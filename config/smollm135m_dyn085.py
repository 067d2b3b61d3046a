# Table 1: SmolLM-135M, SVD dynamic delta_kv 0.85, KV 49.5%. delta_q is not given; we use delta_q = delta_kv
# python svd_init.py config/smollm135m_dyn085.py --out_dir=out/smollm135m_dyn085
# torchrun --nproc_per_node=8 distill.py config/smollm135m_dyn085.py
from config._distill_smollm import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'HuggingFaceTB/SmolLM-135M-Instruct'
mla_layers = None
q_energy = 0.85
kv_energy = 0.85
qk_nope_dim = 32
qk_rope_dim = 32
init = 'svd'
out_dir = "out/smollm135m_dyn085"
