# The embedded default: upcycle the bundled tiny teacher (assets/models/tiny_teacher: d 256, 8 heads, 4 KV heads
# of 32, 6 layers) into MLA with r_kv 8 and d_r 16 by svd_init's init="rorope" (calibrated on the run's own train
# data; d_qk = d_h = 32, r_q full), then distill it from the same teacher on the bundled chat data. KV cache
# (8 + 16) / (2 x 4 x 32) = 9.4% of the teacher's: the ratio of the paper's Llama-3.2-1B kv64. The paper's
# Algorithm 1 at the same cache: --init=svd --q_rank=240 --qk_nope_dim=16 (measured worse; docs/training.md,
# the ablation table).
#   torchrun --standalone --nproc_per_node=2 distill.py config/tiny_kv8.py      (2.5 minutes on 2 CPU cores from a fresh clone, the install included)
init_from = "assets/models/tiny_teacher"
init = "rorope"
kv_rank = 8
qk_rope_dim = 16           # what kv_budget=144 (numbers per token over 6 layers) chooses here
refit = False              # measured here (2026-12-06): refitting W_UV, W_O starts closer (held-out KL at init
                           # 1.657 -> 1.048) but ends farther after these 50 steps (0.169 -> 0.196)
kl_weight = 1.0
ce_weight = 0.0
tokenizer = "bytes"
seq_len = 256
micro_batch = 8
tokens_per_step = 8192
max_steps = 50
lr = 1e-3
warmup_frac = 0.05
log_every = 10
eval_every = 25
eval_batches = 4
ckpt_every = 50
out_dir = "out/tiny_kv8"
