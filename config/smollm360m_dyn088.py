# Table 1: SmolLM-360M, SVD dynamic delta_kv 0.88, KV 49.3%. delta_q is not given; we use delta_q = delta_kv
# python svd_init.py config/smollm360m_dyn088.py --out_dir=out/smollm360m_dyn088
# torchrun --nproc_per_node=8 distill.py config/smollm360m_dyn088.py
from config._distill_smollm import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'HuggingFaceTB/SmolLM-360M-Instruct'
mla_layers = None
q_energy = 0.88
kv_energy = 0.88
qk_nope_dim = 32
qk_rope_dim = 32
init = 'svd'
out_dir = "out/smollm360m_dyn088"
