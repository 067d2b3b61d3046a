# A few DPO steps on CPU for the SmolLM2 student of config/smollm2_135m_kv160_cpu.py (policy and frozen reference),
# with SmolLM2's own tokenizer and ChatML template on the bundled preference pairs:
#   torchrun --standalone --nproc_per_node=2 dpo.py config/smollm2_cpu_dpo.py --init_from=DIR
init_from = "out/smollm2_135m_kv160_cpu/final"
pref_data = ["assets/data/dpo/llamafactory_dpo_en_demo.json"]
max_length = 512
max_prompt_length = 256
beta = 0.1
lr = 5e-6
pairs_per_step = 4
micro_batch = 1
max_steps = 3
warmup_frac = 0.34
dtype = "float32"
eval_pairs = 8
log_every = 1
eval_every = 100
ckpt_every = 3
keep_ckpts = 1
out_dir = "out/smollm2_cpu_dpo"
