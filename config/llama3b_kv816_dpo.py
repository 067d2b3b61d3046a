# Stage 2 of the paper for config/llama3b_kv816.py: DPO of the distilled student, itself the frozen reference.
# torchrun --nproc_per_node=8 dpo.py config/llama3b_kv816_dpo.py
from config._dpo_official import *  # noqa: F401,F403  shared settings; this file overrides
init_from = "out/llama3b_kv816/final"
out_dir = "out/llama3b_kv816_dpo"
