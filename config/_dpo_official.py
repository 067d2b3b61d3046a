# The official X-EcoMLA DPO settings, shared by the *_dpo.py config files (each imports them first):
# beta 0.01, lr 5e-7, cosine, warmup 10%, 4 pairs per GPU x 8 GPUs x 2 accumulation = 64 pairs, max_length 1024,
# max_prompt_length 512, sigmoid loss, 1 epoch, the distilled student as its own reference.
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
