# Table 6: Llama-3.2-1B-Instruct, r_q 736, r_kv 256, d_qk = d_r = 64 = d_h (the two slices are the whole head
# each: allow_qk_overlap), KV 31.3%
# python svd_init.py config/llama1b_kv256_dqk64.py --out_dir=out/llama1b_kv256_dqk64
# torchrun --nproc_per_node=8 distill.py config/llama1b_kv256_dqk64.py
from config._distill_llama1b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = None
q_rank = 736
kv_rank = 256
qk_nope_dim = 64
qk_rope_dim = 64
init = 'svd'
allow_qk_overlap = True
out_dir = "out/llama1b_kv256_dqk64"
