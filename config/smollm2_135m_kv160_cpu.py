# A short CPU run of config/smollm2_135m_kv160.py: the same conversion, distilled on the bundled chat data rendered
# with SmolLM2's own ChatML template, 10 steps of 4,096 tokens (41K tokens), fp32, 2 processes:
#   torchrun --standalone --nproc_per_node=2 distill.py config/smollm2_135m_kv160_cpu.py --init_from=DIR
# (DIR: a local SmolLM2-135M-Instruct folder; without it the hub id is tried)
from config.smollm2_135m_kv160 import *  # noqa: F401,F403
sft_data = ["assets/data/sft/alpaca_en_demo.json", "assets/data/sft/self_instruct_user_oriented.jsonl",
            "assets/data/sft/fastchat_dummy_conversation.json"]
seq_len = 512
micro_batch = 2
tokens_per_step = 4096
max_steps = 10
lr = 1e-4
warmup_frac = 0.1
dtype = "float32"
activation_checkpointing = False
log_every = 2
eval_every = 100
eval_batches = 4
ckpt_every = 10
keep_ckpts = 1
out_dir = "out/smollm2_135m_kv160_cpu"
