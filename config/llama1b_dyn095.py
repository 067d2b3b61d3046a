# Tables 1, 7 (its delta_q = delta_kv = 0.95, d_qk 32 row) and 8: Llama-3.2-1B-Instruct, SVD dynamic
# delta_q = delta_kv = 0.95, d_qk = d_r = 32, KV 54.7%
# python svd_init.py config/llama1b_dyn095.py --out_dir=out/llama1b_dyn095
# torchrun --nproc_per_node=8 distill.py config/llama1b_dyn095.py
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = None
q_energy = 0.95
kv_energy = 0.95
qk_nope_dim = 32
qk_rope_dim = 32
init = 'svd'

# --- distillation (distill.py; the official X-EcoMLA settings) ---
teacher = ""               # "" = the source itself; or meta-llama/Llama-3.2-3B-Instruct, meta-llama/Llama-3.1-8B-Instruct
kl_weight = 1.0
ce_weight = 0.0
sft_data = ["sftdatasetv3"]  # JunxiongWang/sftdatasetv3: OpenHermes-2.5 + GenQA + Infinity-Instruct (see data.py)
tokenizer = "llama3"
seq_len = 2048
micro_batch = 12
tokens_per_step = 393216    # 12 per GPU x 8 GPUs x 2 accumulation x 2048
epochs = 1.0
lr = 8e-5
warmup_frac = 0.01
betas = (0.9, 0.98)
dtype = "bfloat16"
activation_checkpointing = True
out_dir = "out/llama1b_dyn095"
