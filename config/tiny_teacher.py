# The tiny CPU teacher (assets/models/tiny_teacher): a Llama with GQA shaped like Llama 3.2 in miniature (d 256,
# 8 heads, 4 KV heads of 32 dims, 6 layers, tied embeddings, byte-level tokenizer with Llama 3's special tokens),
# pre-trained from scratch with CE only by distill.py on the bundled corpus plus the chat data. Produced with:
#   torchrun --standalone --nproc_per_node=2 distill.py config/tiny_teacher.py
# then copied (bf16) from out/tiny_teacher/final to assets/models/tiny_teacher.
init_from = "scratch"
model_config = dict(vocab_size=512, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32, intermediate_size=768,
                    max_seq_len=1024, rope_theta=10000.0, tie_embeddings=True, bos_id=256, eos_id=[257, 265])
kl_weight = 0.0
ce_weight = 1.0
sft_data = ["assets/data/corpus/tinyshakespeare.txt", "assets/data/corpus/wiki_demo.txt",
            "assets/data/corpus/c4_demo.jsonl", "assets/data/corpus/war_and_peace.txt",
            "assets/data/sft/alpaca_en_demo.json", "assets/data/sft/self_instruct_user_oriented.jsonl",
            "assets/data/sft/fastchat_dummy_conversation.json"]
tokenizer = "bytes"
seq_len = 256
micro_batch = 16
tokens_per_step = 16384
max_steps = 500
lr = 2e-3
warmup_frac = 0.03
weight_decay = 0.1
log_every = 10
compile = True
eval_every = 50
ckpt_every = 50
out_dir = "out/tiny_teacher"
export_dtype = "bfloat16"
teacher = "none"
