# Stage 2 of the paper for config/llama1b_kv64.py: DPO of the distilled student, itself the frozen reference.
# torchrun --nproc_per_node=8 dpo.py config/llama1b_kv64_dpo.py
from config._dpo_official import *  # noqa: F401,F403  shared settings; this file overrides
init_from = "out/llama1b_kv64/final"
out_dir = "out/llama1b_kv64_dpo"
