# DPO of the tiny distilled student (assets/models/tiny_kv8, made by config/tiny_kv8.py), itself the frozen
# reference, on the bundled preference pairs (HH-RLHF harmless + LLaMA-Factory's demo). About a minute on 2 cores:
#   torchrun --standalone --nproc_per_node=2 dpo.py config/tiny_dpo.py
# (--init_from=out/tiny_kv8/final uses the student your own distillation run wrote.)
# The paper's beta 0.01 / lr 5e-7 are for a 1B model over 3 datasets; at this size and budget they would not move
# the model, so this tiny run uses a larger beta and lr.
init_from = "assets/models/tiny_kv8"
tokenizer = "bytes"
max_length = 256
max_prompt_length = 128
beta = 0.1
lr = 5e-5
warmup_frac = 0.1
pairs_per_step = 32
micro_batch = 4
max_steps = 25
val_every = 20
eval_pairs = 128
precompute_ref = False     # 20 steps see 640 of 2,473 pairs: computing the reference for all would cost more
log_every = 5
eval_every = 100
ckpt_every = 25
out_dir = "out/tiny_dpo"
