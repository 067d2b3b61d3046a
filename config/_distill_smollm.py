# Distillation settings shared by the SmolLM config files (the paper gives no SmolLM batch or lr: the 1B settings).
# Each row file imports them: `from config._distill_...  import *`.
# SmolLM's own tokenizer (tokenizer.json, 49,152 ids) and ChatML template are read from the model folder.
# teacher: "" = the source itself (a teacher must share SmolLM's vocabulary, so no Llama teacher)
teacher = ""
kl_weight = 1.0
ce_weight = 0.0
# JunxiongWang/sftdatasetv3: OpenHermes-2.5 + GenQA + Infinity-Instruct (see data.py)
sft_data = ["sftdatasetv3"]
tokenizer = ""          # the model folder's own
seq_len = 2048
micro_batch = 12
tokens_per_step = 393216    # SmolLM: the paper gives no batch; the 1B setting
epochs = 1.0
lr = 8e-5  # not given for SmolLM; the 1B value
warmup_frac = 0.01
betas = (0.9, 0.98)
dtype = "bfloat16"
activation_checkpointing = True
