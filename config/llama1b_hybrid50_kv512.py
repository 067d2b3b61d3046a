# Table 8: Llama-3.2-1B-Instruct, MLA in layers 1,3,5,7,8,10,12,14, SVD fixed r_q 864, r_kv 512, KV 76.6%
# The paper reports 78.1% (B.4.1) but its stated settings (r_kv 512, d_qk = d_r = 32, r_q 854 in the text, 864 in
# Table 6) give 8 x 1024 + 8 x 544 = 76.6% of 16 x 1024; 78.1% would need 576 per MLA layer (d_r = 64). We keep the
# stated settings.
# python svd_init.py config/llama1b_hybrid50_kv512.py --out_dir=out/llama1b_hybrid50_kv512
# torchrun --nproc_per_node=8 distill.py config/llama1b_hybrid50_kv512.py
from config._distill_llama1b import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = [1, 3, 5, 7, 8, 10, 12, 14]
q_rank = 864
kv_rank = 512
qk_nope_dim = 32
qk_rope_dim = 32
init = 'svd'
out_dir = "out/llama1b_hybrid50_kv512"
