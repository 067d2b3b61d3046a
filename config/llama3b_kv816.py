# Table 1: Llama-3.2-3B-Instruct, SVD fixed r_q 1536, r_kv 816, d_qk = d_r = 64, KV 43.0% (model card)
# python svd_init.py config/llama3b_kv816.py --out_dir=out/llama3b_kv816
init_from = 'meta-llama/Llama-3.2-3B-Instruct'
mla_layers = None
q_rank = 1536
kv_rank = 816
qk_nope_dim = 64
qk_rope_dim = 64
init = 'svd'
