# Table 1: SmolLM-360M, random init, r_kv 288, KV 50%. r_q is not given in the paper; chosen so the attention
# keeps the source's parameter count (our choice)
# python svd_init.py config/smollm360m_random_kv288.py --out_dir=out/smollm360m_random_kv288
# torchrun --nproc_per_node=8 distill.py config/smollm360m_random_kv288.py
from config._distill_smollm import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'HuggingFaceTB/SmolLM-360M-Instruct'
mla_layers = None
q_rank = 424
kv_rank = 288
qk_nope_dim = 32
qk_rope_dim = 32
init = 'random'
out_dir = "out/smollm360m_random_kv288"
