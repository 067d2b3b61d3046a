# Table 8: Llama-3.2-1B-Instruct, MLA in layers 1,3,5,7,8,10,12,14, SVD fixed r_q 864, r_kv 512, KV 76.6%
# The paper reports 78.1% (B.4.1) but its stated settings (r_kv 512, d_qk = d_r = 32, r_q 854 in the text, 864 in
# Table 6) give 8 x 1024 + 8 x 544 = 76.6% of 16 x 1024; 78.1% would need 576 per MLA layer (d_r = 64). We keep the
# stated settings.
# python svd_init.py config/llama1b_hybrid50_kv512.py --out_dir=out/llama1b_hybrid50_kv512
# torchrun --nproc_per_node=8 distill.py config/llama1b_hybrid50_kv512.py
init_from = 'meta-llama/Llama-3.2-1B-Instruct'
mla_layers = [1, 3, 5, 7, 8, 10, 12, 14]
q_rank = 864
kv_rank = 512
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
out_dir = "out/llama1b_hybrid50_kv512"
