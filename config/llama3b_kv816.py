# Table 1: Llama-3.2-3B-Instruct, SVD fixed r_q 1536, r_kv 816, d_qk = d_r = 64, KV 43.0% (model card)
# python svd_init.py config/llama3b_kv816.py --out_dir=out/llama3b_kv816
# torchrun --nproc_per_node=8 distill.py config/llama3b_kv816.py
init_from = 'meta-llama/Llama-3.2-3B-Instruct'
mla_layers = None
q_rank = 1536
kv_rank = 816
qk_nope_dim = 64
qk_rope_dim = 64
init = 'svd'

# --- distillation (distill.py; the official X-EcoMLA settings) ---
teacher = ""               # "" = the source itself; or meta-llama/Llama-3.2-3B-Instruct, meta-llama/Llama-3.1-8B-Instruct
kl_weight = 1.0
ce_weight = 0.0
sft_data = ["sftdatasetv3"]  # JunxiongWang/sftdatasetv3: OpenHermes-2.5 + GenQA + Infinity-Instruct (see data.py)
tokenizer = "llama3"
seq_len = 2048
micro_batch = 6
tokens_per_step = 196608    # 6 per GPU x 8 GPUs x 2 accumulation x 2048
epochs = 1.0
lr = 4e-5
warmup_frac = 0.01
betas = (0.9, 0.98)
dtype = "bfloat16"
activation_checkpointing = True
out_dir = "out/llama3b_kv816"
