# Table 1's SmolLM-135M row (SVD fixed r_kv 160, d_qk = d_r = 32, KV 50%) on SmolLM2-135M-Instruct, the current
# release of the same shape (d 576, 9 heads, 3 KV heads of 64, 30 layers, vocab 49,152, ChatML template).
# Weights: the hub id below; a local folder with --init_from=DIR (e.g. one built by a conversion script).
#   python svd_init.py config/smollm2_135m_kv160.py --out_dir=out/smollm2_135m_kv160
#   torchrun --nproc_per_node=8 distill.py config/smollm2_135m_kv160.py
from config._distill_smollm import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'HuggingFaceTB/SmolLM2-135M-Instruct'
mla_layers = None
q_rank = 264               # not given in the paper: keeps the attention's parameter count (our choice)
kv_rank = 160
qk_nope_dim = 32
qk_rope_dim = 32
init = 'svd'
out_dir = "out/smollm2_135m_kv160"
