# Stage 2 of the paper for config/llama1b_kv64.py: DPO of the distilled student, itself the frozen reference.
# Official settings: beta 0.01, lr 5e-7, cosine, warmup 10%, batch 4 per GPU (x 8 GPUs x 2 accumulation = 64 pairs),
# max_length 1024, max_prompt_length 512, sigmoid loss, 1 epoch.
# torchrun --nproc_per_node=8 dpo.py config/llama1b_kv64_dpo.py
init_from = "out/llama1b_kv64/final"
pref_data = ["ultrafeedback", "orca_dpo_pairs", "llama3_ultrafeedback_armorm"]   # see data.HUB_SETS
val_data = ["ultrafeedback_test"]
tokenizer = "llama3"
max_length = 1024
max_prompt_length = 512
beta = 0.01
lr = 5e-7
warmup_frac = 0.1
pairs_per_step = 64
micro_batch = 4
epochs = 1.0
dtype = "bfloat16"
activation_checkpointing = True
precompute_ref = True
out_dir = "out/llama1b_kv64_dpo"
