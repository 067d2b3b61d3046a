# Table 1: SmolLM-135M, SVD fixed r_kv 160, KV 50%. r_q is not given in the paper; chosen so the attention keeps
# the source's parameter count (our choice)
# python svd_init.py config/smollm135m_kv160.py --out_dir=out/smollm135m_kv160
# torchrun --nproc_per_node=8 distill.py config/smollm135m_kv160.py
init_from = 'HuggingFaceTB/SmolLM-135M-Instruct'
mla_layers = None
q_rank = 264
kv_rank = 160
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
tokens_per_step = 393216    # SmolLM: the paper gives no batch; the 1B setting
epochs = 1.0
lr = 8e-5  # not given for SmolLM; the 1B value
warmup_frac = 0.01
betas = (0.9, 0.98)
dtype = "bfloat16"
activation_checkpointing = True
out_dir = "out/smollm135m_kv160"
