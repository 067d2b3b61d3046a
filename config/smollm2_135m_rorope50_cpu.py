# The CPU comparison of docs/init.md: config/smollm2_135m_rorope50.py distilled exactly as
# config/smollm2_135m_kv160_cpu.py distils Algorithm 1's student (same data, schedule and held-out set):
#   torchrun --standalone --nproc_per_node=2 distill.py config/smollm2_135m_rorope50_cpu.py --init_from=DIR
from config.smollm2_135m_kv160_cpu import *  # noqa: F401,F403
init = 'rorope'
q_rank = None              # full r_q
qk_nope_dim = None         # d_qk = d_h
refit = False              # as config/smollm2_135m_rorope50.py: docs/init.md's run predates the refit
calib_tokens = 8192
calib_seq_len = 512
out_dir = "out/smollm2_135m_rorope50_cpu"
