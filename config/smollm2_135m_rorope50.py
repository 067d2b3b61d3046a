# SmolLM2-135M-Instruct at 50% of its KV cache with svd_init's init="rorope" (RoRoPE shared key, activation-aware
# factorisation; docs/init.md): r_kv 160 and d_r 32 in every layer, d_qk = d_h = 64, r_q full: the
# cache shape of config/smollm2_135m_kv160.py (Algorithm 1). (--kv_rank=None --qk_rope_dim=None --kv_budget=0.5
# lets the calibration choose instead: d_r 64, r_kv 128 on the bundled data, KL at init 0.748 vs 0.752.)
#   python svd_init.py config/smollm2_135m_rorope50.py --init_from=DIR --out_dir=out/smollm2_rorope50
#   torchrun --nproc_per_node=8 distill.py config/smollm2_135m_rorope50.py
from config._distill_smollm import *  # noqa: F401,F403  shared settings; this file overrides
init_from = 'HuggingFaceTB/SmolLM2-135M-Instruct'
init = 'rorope'
kv_rank = 160
qk_rope_dim = 32
refit = False              # the numbers docs/init.md gives for this file were measured before the refit of W_UV,
                           # W_O existed; --refit=True starts closer (docs/init.md, "Refitting W_UV and W_O")
calib_tokens = 8192
out_dir = "out/smollm2_135m_rorope50"
