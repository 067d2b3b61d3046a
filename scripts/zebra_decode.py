"""
Whole-model decode speed at long contexts: the source (GQA), an all-MLA student and Zebra hybrids, one decode step
at a time against caches of `contexts` tokens (allocated, not prefilled: the same work per step; see
evaluate.decode_speed). Prints tokens/s and the cache each holds.

    python scripts/zebra_decode.py --models=SRC,OUT/mla1/e2e/final,OUT/mla0.25/e2e/final --contexts=1024,8192,32768
    python scripts/zebra_decode.py --models=... --device=cuda --dtype=bfloat16 --batches=1,8,64   # a GPU
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from configurator import configure  # noqa: E402
from evaluate import decode_speed  # noqa: E402
from model import Transformer, resolve_dtype  # noqa: E402

models = "assets/models/tiny_teacher"   # comma-separated model folders
batches = "1"
contexts = "1024,8192,32768"
new_tokens = 8
repeats = 2
device = "cpu"
dtype = "float32"
configure(globals())
dt = resolve_dtype(dtype, torch.device(device).type)
print(f"device {device}, {dt}, {torch.get_num_threads()} threads; {new_tokens} decode steps, best of {repeats}")
print("| model | layers (GQA / MLA / Mamba2) | batch | context | cache MiB | decode tok/s |")
print("|---|---|---|---|---|---|")
for path in models.split(","):
    m = Transformer.from_pretrained(path, dtype=dt, device=device).eval()
    c = m.config
    kinds = [c.layer_type(i) for i in range(c.n_layers)]
    mix = f"{kinds.count('gqa')} / {kinds.count('mla')} / {kinds.count('mamba2')}"
    for b in map(int, batches.split(",")):
        for T in map(int, contexts.split(",")):
            if T + new_tokens > c.max_seq_len:
                c.max_seq_len = T + new_tokens  # speed only: positions past the trained length are fine here
            r = decode_speed(m, b, T, new_tokens, repeats, prefill=False)
            print(f"| {path} | {mix} | {b} | {T} | {m.kv_cache_bytes(b, T, dt) / 2**20:.1f} | "
                  f"{r['decode_tokens_per_s']:,.1f} |", flush=True)
    del m
