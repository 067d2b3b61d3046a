# Table 1: SmolLM-135M, random init, r_kv 160, KV 50%. r_q is not given in the paper; chosen so the attention
# keeps the source's parameter count (our choice)
# python svd_init.py config/smollm135m_random_kv160.py --out_dir=out/smollm135m_random_kv160
init_from = 'HuggingFaceTB/SmolLM-135M-Instruct'
mla_layers = None
q_rank = 264
kv_rank = 160
qk_nope_dim = 32
qk_rope_dim = 32
init = 'random'
