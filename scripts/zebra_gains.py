"""
The norm-gain check of docs/zebra.md: KL(source || source with `layers` as Mamba2) at init with the published norm
weights (1), with the attention removed (0), and with zebra.fit_gains' fitted gains. No MLA layers: the Mamba2 init alone.

    python scripts/zebra_gains.py                                   # the tiny teacher
    python scripts/zebra_gains.py --init_from=DIR --tokenizer= --layers=[13,15,16,17,19,20,21,22,23,24,25,26,27,28,29]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from configurator import configure  # noqa: E402
from data import BUNDLED_SFT, PackedData, build_cache, calibration_ids  # noqa: E402
from model import Transformer  # noqa: E402
from svd_init import kl_per_token  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from zebra import fit_gains, mamba_from_attention  # noqa: E402

init_from = "assets/models/tiny_teacher"
tokenizer = "bytes"        # "" = the model folder's own
layers = [1, 3, 4, 5]      # the layers made Mamba2
data = list(BUNDLED_SFT)
data_cache = "out/data_cache"
calib_tokens = 8192
seq_len = 256
configure(globals())
tok = Tokenizer.from_name(tokenizer, init_from)
src = Transformer.from_pretrained(init_from).eval()
calib = calibration_ids(data, tok, data_cache, calib_tokens, seq_len, 0)
held = PackedData(build_cache(data, tok, data_cache), "val", seq_len).sample(4 * seq_len, 0)
gains = fit_gains(src, layers, calib)
for name, g in (("weight 1 (published)", None), ("weight 0 (attention removed)",
                                                {i: torch.zeros_like(v) for i, v in gains.items()}),
                ("fitted gains", gains)):
    m = mamba_from_attention(src, layers, gains=g, copy=False).eval()
    print(f"{init_from}: Mamba2 layers {layers}, {name}: KL at init {kl_per_token(src, m, held)[0]:.3f} "
          f"on {held.numel()} held-out tokens", flush=True)
