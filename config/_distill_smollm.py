# Distillation settings shared by the config files of SmolLM students (the paper gives no SmolLM batch or lr: the 1B settings).
# Each row file imports them: `from config._distill_...  import *`.
# teacher: "" = the source itself; or meta-llama/Llama-3.2-3B-Instruct, meta-llama/Llama-3.1-8B-Instruct
teacher = ""
kl_weight = 1.0
ce_weight = 0.0
# JunxiongWang/sftdatasetv3: OpenHermes-2.5 + GenQA + Infinity-Instruct (see data.py)
sft_data = ["sftdatasetv3"]
tokenizer = "llama3"
seq_len = 2048
micro_batch = 12
tokens_per_step = 393216    # SmolLM: the paper gives no batch; the 1B setting
epochs = 1.0
lr = 8e-5  # not given for SmolLM; the 1B value
warmup_frac = 0.01
betas = (0.9, 0.98)
dtype = "bfloat16"
activation_checkpointing = True
