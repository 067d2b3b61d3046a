# The embedded default: upcycle the bundled tiny teacher (assets/models/tiny_teacher: d 256, 8 heads, 4 KV heads
# of 32, 6 layers) into MLA with r_kv 8 and d_qk = d_r = 16, then distill it from the same teacher on the bundled
# chat data. KV cache (8 + 16) / (2 x 4 x 32) = 9.4% of the teacher's: the ratio of the paper's Llama-3.2-1B kv64.
#   torchrun --standalone --nproc_per_node=2 distill.py config/tiny_kv8.py      (about 2.5 minutes on 2 CPU cores; 3 with the install)
init_from = "assets/models/tiny_teacher"
q_rank = 240               # keeps the attention's parameter count close to the teacher's (as the paper's r_q do)
kv_rank = 8
qk_nope_dim = 16
qk_rope_dim = 16
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
