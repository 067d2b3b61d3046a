"""svd_init.py: exact reconstruction at full rank, Eckart-Young truncation, dynamic ranks, hybrids, KL at init on a
real pre-trained checkpoint (random weights have flat spectra), round trips, the paper's cache percentages."""
import glob
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from conftest import STORIES, random_model, tiny_config
from configurator import configure
from model import Attention, MLAttention, ModelConfig, Transformer
from svd_init import Conversion, energy_rank, kl_per_token, mla_config, teacher_text, upcycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def attn_weights(model, i):
    """Paper orientation (in x out) of a GQA layer's W_Q, and K, V repeated to all heads."""
    a, c = model.model.layers[i].self_attn, model.config
    g = c.n_heads // c.n_kv_heads
    rep = lambda W: W.T.reshape(c.dim, c.n_kv_heads, c.head_dim).repeat_interleave(g, 1)  # (d, H, d_h)
    return a.q_proj.weight.T.reshape(c.dim, c.n_heads, c.head_dim), rep(a.k_proj.weight), rep(a.v_proj.weight)


def mla_products(student, i):
    """W_DQ W_UQ, W_DQ W_QR, W_DKV W_UK, W_DKV W_UV per head, (d, H, *)."""
    a, c = student.model.layers[i].self_attn, student.config
    H = c.n_heads
    prod = lambda down, up: (down.weight.T @ up.weight.T).reshape(c.dim, H, -1)
    return prod(a.W_DQ, a.W_UQ), prod(a.W_DQ, a.W_QR), prod(a.W_DKV, a.W_UK), prod(a.W_DKV, a.W_UV)


@pytest.mark.parametrize("source", ["stories260K", "random_gqa"])
def test_full_rank_reproduces_q_k_v(stories, source):
    teacher = stories if source == "stories260K" else random_model(tiny_config())
    c = teacher.config
    d_h = c.head_dim
    d_qk, d_r = d_h // 2, d_h // 2
    student = upcycle(teacher, q_rank=min(c.dim, c.n_heads * d_h), kv_rank=min(c.dim, 2 * c.n_kv_heads * d_h),
                      qk_nope_dim=d_qk, qk_rope_dim=d_r)
    for i in range(c.n_layers):
        Q, K, V = attn_weights(teacher, i)
        UQ, QR, UK, UV = mla_products(student, i)
        assert_close(UQ, Q[:, :, :d_qk], rtol=0, atol=1e-5)          # no-RoPE query dims
        assert_close(QR, Q[:, :, d_h - d_r:], rtol=0, atol=1e-5)      # RoPE query dims: the last d_r (eq. 9)
        assert_close(UK, K[:, :, :d_qk], rtol=0, atol=1e-5)           # repeated K, first d_qk dims (eq. 11)
        assert_close(UV, V, rtol=0, atol=1e-5)                        # repeated V, whole
        W_KR = student.model.layers[i].self_attn.W_KR.weight.T
        assert_close(W_KR, K.mean(1)[:, d_h - d_r:], rtol=0, atol=1e-6)  # head-averaged K, last d_r (eq. 12)
        assert torch.equal(student.model.layers[i].self_attn.o_proj.weight,
                           teacher.model.layers[i].self_attn.o_proj.weight)


@pytest.mark.parametrize("r_q,r_kv", [(40, 24), (16, 8), (5, 3)])
def test_truncation_error_is_discarded_energy(stories, r_q, r_kv):
    """Eckart-Young: the squared Frobenius error of the rank-r factorisation equals the sum of the discarded squared
    singular values, for Q and for the joint repeated [K, V] (checked against an SVD of the explicitly repeated
    matrix, which also checks the un-repeated shortcut)."""
    c = stories.config
    d_h = c.head_dim
    # d_qk = d_r = d_h: each factor then holds whole heads, so the full matrices can be compared
    student = upcycle(stories, q_rank=r_q, kv_rank=r_kv, qk_nope_dim=d_h, qk_rope_dim=d_h, allow_qk_overlap=True)
    for i in range(c.n_layers):
        Q, K, V = attn_weights(stories, i)
        UQ, _, UK, UV = mla_products(student, i)
        s_q = torch.linalg.svdvals(Q.reshape(c.dim, -1).double())
        err_q = (Q - UQ).double().pow(2).sum()
        assert_close(err_q, s_q[r_q:].pow(2).sum(), rtol=1e-4, atol=1e-6)
        KV = torch.cat([K.reshape(c.dim, -1), V.reshape(c.dim, -1)], 1).double()
        s_kv = torch.linalg.svdvals(KV)
        err_kv = (K - UK).double().pow(2).sum() + (V - UV).double().pow(2).sum()
        assert_close(err_kv, s_kv[r_kv:].pow(2).sum(), rtol=1e-4, atol=1e-6)
        assert err_q > 0 and err_kv > 0


def test_dynamic_rank_is_smallest_reaching_energy(stories):
    c = stories.config
    per_delta = {}
    for delta in (0.5, 0.8, 0.9, 0.99, 1.0):
        report = []
        upcycle(stories, q_energy=delta, kv_energy=delta, report=report)
        per_delta[delta] = report
        for r in report:
            Q, K, V = attn_weights(stories, r["layer"])
            s_q = torch.linalg.svdvals(Q.reshape(c.dim, -1).double())
            s_kv = torch.linalg.svdvals(torch.cat([K.reshape(c.dim, -1), V.reshape(c.dim, -1)], 1).double())
            for s, R in ((s_q, r["r_q"]), (s_kv, r["r_kv"])):
                e = s.pow(2).cumsum(0) / s.pow(2).sum()
                assert e[R - 1] >= delta - 1e-6                       # R reaches delta ...
                assert R == 1 or e[R - 2] < delta                     # ... and R - 1 does not
    assert len({r["r_kv"] for r in per_delta[0.9]}) > 1               # ranks differ across layers
    assert len({r["r_q"] for r in per_delta[0.9]}) > 1
    assert all(r["r_q"] == 64 and r["r_kv"] == 64 for r in per_delta[1.0])
    s = torch.tensor([3.0, 2.0, 1.0])                                  # energies 9, 13, 14 of 14
    assert [energy_rank(s, d) for d in (0.5, 9 / 14, 0.65, 13 / 14, 0.95, 1.0)] == [1, 1, 2, 2, 3, 3]


def test_hybrid_changes_only_listed_layers(stories):
    student = upcycle(stories, mla_layers=[1, 3], q_rank=32, kv_rank=16)
    assert [type(b.self_attn) for b in student.model.layers] == [Attention, MLAttention, Attention, MLAttention,
                                                                 Attention]
    src = stories.state_dict()
    for k, v in student.state_dict().items():
        if not k.startswith(("model.layers.1.self_attn.", "model.layers.3.self_attn.")) or k.endswith("o_proj.weight"):
            assert torch.equal(v, src[k]), k
    # copies, not aliases: training the student must never touch the teacher
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, stories.model.layers[0].mlp.up_proj.weight)
    shared = upcycle(stories, mla_layers=[1, 3], q_rank=32, kv_rank=16, copy=False)   # convert-and-save mode
    assert shared.model.layers[0].mlp.up_proj.weight.data_ptr() == stories.model.layers[0].mlp.up_proj.weight.data_ptr()
    # a second pass converts more layers of the hybrid and keeps the first ones' ranks
    more = upcycle(student, mla_layers=[0], q_rank=8, kv_rank=4)
    assert more.config.mla_layers == (0, 1, 3) and more.config.kv_rank == (4, 16, 16)


def test_svd_init_beats_random_and_full_rank_beats_rank_8(stories):
    """At r_kv 64 and 32 the SVD init is over a nat closer to the teacher than random draws (mean of 3); at r_kv
    16 and 8 the two are within noise of each other on this model (docs/init.md: the literal RoPE split costs that)."""
    idx = teacher_text(stories, 8, 128, seed=0)
    kl = lambda r_kv, init, seed=0: kl_per_token(
        stories, upcycle(stories, q_rank=64, kv_rank=r_kv, init=init, seed=seed).eval(), idx)[0]
    for r_kv in (64, 32):
        random_mean = sum(kl(r_kv, "random", k) for k in range(3)) / 3
        assert kl(r_kv, "svd") < random_mean - 0.5, (r_kv, kl(r_kv, "svd"), random_mean)
    assert kl(64, "svd") < kl(8, "svd")
    # the literal paper split loses positional information: several nats even at full rank (a finding, see docs/init.md)
    assert 2.0 < kl(64, "svd") < 6.0


def test_round_trip(stories, tmp_path):
    student = upcycle(stories, mla_layers=[0, 2, 4], q_energy=0.9, kv_energy=0.8, latent_norm="both",
                      latent_norm_init="ones").eval()
    assert len(set(student.config.kv_rank)) > 1                       # per-layer ranks survive the round trip
    student.save_pretrained(tmp_path / "s")
    back = Transformer.from_pretrained(tmp_path / "s").eval()
    assert back.config == student.config
    idx = torch.randint(0, 512, (2, 40))
    assert torch.equal(back(idx), student(idx))


def test_bad_settings(stories):
    cases = [
        (dict(q_rank=8, kv_rank=8, qk_nope_dim=6, qk_rope_dim=4), "d_qk \\+ d_r = 10 > d_h = 8"),
        (dict(q_rank=8, kv_rank=8, qk_nope_dim=4, qk_rope_dim=3), "even 2 <= d_r"),
        (dict(q_rank=8, kv_rank=8, qk_nope_dim=9, qk_rope_dim=4, allow_qk_overlap=True), "d_qk <= d_h"),
        (dict(q_rank=0, kv_rank=8), "q_rank=0 must be an integer in \\[1, 64\\]"),
        (dict(q_rank=8, kv_rank=65), "kv_rank=65 must be an integer in \\[1, 64\\].*rank at most"),
        (dict(q_rank=8, kv_energy=1.5), "kv_energy=1.5 must be in \\(0, 1\\]"),
        (dict(q_rank=8, kv_energy=0.0), "must be in \\(0, 1\\]"),
        (dict(q_rank=8, q_energy=0.9, kv_rank=8), "exactly one of q_rank"),
        (dict(q_rank=8, q_energy=0.9, kv_energy=0.5), "exactly one of q_rank"),
        (dict(q_rank=8), "exactly one of kv_rank"),
        (dict(q_rank=8, kv_rank=8, mla_layers=[5]), "mla_layers=\\[5\\]"),
        (dict(q_rank=8, kv_rank=8, mla_layers=[1, 1]), "distinct"),
        (dict(q_rank=8, kv_rank=8, init="xavier"), "init='xavier'"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            upcycle(stories, **kw)
    hybrid = upcycle(stories, mla_layers=[1], q_rank=8, kv_rank=8)
    with pytest.raises(ValueError, match="already MLA"):
        upcycle(hybrid, mla_layers=[1], q_rank=8, kv_rank=8)


# Published shapes (config.json of each hub id) and the KV-cache sizes the paper reports for the fixed-rank rows
PUBLISHED = {
    "meta-llama/Llama-3.2-1B-Instruct": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64),
    "meta-llama/Llama-3.2-3B-Instruct": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128),
    "HuggingFaceTB/SmolLM-135M-Instruct": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64),
    "HuggingFaceTB/SmolLM-360M-Instruct": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, head_dim=64),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64),
}
PAPER_KV = {"llama1b_kv512": 53.1, "llama1b_random_kv512": 53.1, "llama1b_kv256": 28.1, "llama1b_kv128": 15.6,
            "llama1b_kv64": 9.4, "llama1b_kv48": 6.25, "llama3b_kv816": 43.0, "llama3b_random_kv816": 43.0,
            "llama1b_kv512_dqk64": 56.3, "llama1b_kv256_dqk64": 31.3, "llama1b_kv128_dqk64": 18.8,
            "smollm135m_kv160": 50.0, "smollm2_135m_kv160": 50.0, "smollm2_135m_kv160_cpu": 50.0,
            "smollm2_135m_rorope50": 50.0, "smollm2_135m_rorope50_cpu": 50.0, "smollm135m_random_kv160": 50.0, "smollm360m_kv288": 50.0,
            "smollm360m_random_kv288": 50.0,
            # the paper says 78.1% for these two; its stated settings give 76.6% (see the config files)
            "llama1b_hybrid50_kv512": 76.6, "llama1b_hybrid50_random_kv512": 76.6}


def load_cfg(path):
    ns = dict(init_from="", calib_tokens=8192, calib_seq_len=0, conversion=Conversion())  # as distill.py holds them
    return configure(ns, [path])


def test_config_files_give_the_papers_cache_sizes():
    files = sorted(f for f in glob.glob(os.path.join(ROOT, "config", "*.py"))    # the paper's MLA rows
                   if not os.path.basename(f).startswith(("tiny", "_")) and not f.endswith("_dpo.py"))
    names = {os.path.basename(f)[:-3] for f in files}
    assert set(PAPER_KV) <= names
    for f in files:
        s = load_cfg(f)                                                # every config file is valid
        shape = PUBLISHED[s["init_from"]]
        src = ModelConfig(vocab_size=8, intermediate_size=8, **shape)
        if s["kv_rank"] is None:                                        # dynamic: the ranks need the real weights
            assert 0 < s["q_energy"] <= 1 and 0 < s["kv_energy"] <= 1
            continue
        layers = s["mla_layers"] if s["mla_layers"] is not None else range(src.n_layers)
        Conversion(**{k: s[k] for k in ("mla_layers", "q_rank", "kv_rank", "qk_nope_dim", "qk_rope_dim", "init",
                                         "kv_budget", "allow_qk_overlap")}).checked(src, calib_tokens=s["calib_tokens"])
        d_qk = s["qk_nope_dim"] or (src.head_dim if s["init"] == "rorope" else None)
        q_rank = s["q_rank"] or min(src.dim, src.n_heads * src.head_dim)
        cfg = mla_config(src, {i: (q_rank, s["kv_rank"]) for i in layers}, d_qk, s["qk_rope_dim"])
        with torch.device("meta"):
            pct = 100 * Transformer(cfg).kv_cache_elements_per_token() / Transformer(src).kv_cache_elements_per_token()
        name = os.path.basename(f)[:-3]
        assert abs(pct - PAPER_KV[name]) < 0.051, (name, pct)       # the paper rounds to 0.1 (31.25 -> 31.3)


def test_command_line(tmp_path):
    out = tmp_path / "kv8"
    cfg = tmp_path / "c.py"
    cfg.write_text("q_rank = 32\nkv_rank = 8\nqk_nope_dim = 4\nqk_rope_dim = 4\nmla_layers = [0, 1, 2, 3, 4]\n")
    r = subprocess.run([sys.executable, "svd_init.py", str(cfg), f"--init_from={STORIES}", f"--out_dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "18.75%" in r.stdout and "KL(teacher||student) at init" in r.stdout
    m = Transformer.from_pretrained(out)
    assert m.config.kv_rank == (8,) * 5 and m.kv_cache_elements_per_token() == 5 * 12
    assert (out / "run_config.json").exists() and (out / "tokenizer_tok512.json").exists()
    r = subprocess.run([sys.executable, "svd_init.py", "--kv_rnak=3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "unknown setting 'kv_rnak'" in r.stderr


def test_command_line_rorope(tmp_path):
    """init="rorope" from the command line; stories260K has no tokenizer, so it calibrates on its own samples."""
    out = tmp_path / "ror"
    r = subprocess.run([sys.executable, "svd_init.py", f"--init_from={STORIES}", f"--out_dir={out}", "--init=rorope",
                        "--kv_budget=0.5", "--calib_tokens=512", "--calib_seq_len=64"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "calibration: 512 tokens (8 x 64, seed 0) of text sampled from the source" in r.stdout
    m = Transformer.from_pretrained(out)
    src = Transformer.from_pretrained(STORIES)
    assert m.kv_cache_elements_per_token() <= src.kv_cache_elements_per_token() // 2
    r = subprocess.run([sys.executable, "svd_init.py", "--init=rorope", "--kv_budget=0.5", "--calib_tokens=8",
                        f"--out_dir={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "calibration has 8 tokens, fewer than the rank" in r.stderr


def test_teacher_text_is_sampled_in_bounded_batches(stories):
    """Calibration text for a source without a tokenizer is sampled 16 sequences at a time (all at once, a large
    calib_tokens allocated every sequence's caches together: 22 GB); the first 16 are what one batch gives."""
    torch.manual_seed(0)
    one_batch = stories.generate(torch.full((16, 1), stories.config.bos_id), 23, temperature=1.0)
    many = teacher_text(stories, 40, 24, seed=0)
    assert many.shape == (40, 24) and torch.equal(many[:16], one_batch)


def test_a_conversion_object_and_keywords_build_the_same_student(tmp_path):
    src = random_model(tiny_config(), seed=3)
    kw = dict(q_rank=24, kv_rank=12, qk_nope_dim=4, qk_rope_dim=4)
    a = upcycle(src, **kw)
    b = upcycle(src, Conversion(**kw))
    c = upcycle(src, Conversion(q_rank=8, kv_rank=12, qk_nope_dim=4, qk_rope_dim=4), q_rank=24)  # keywords win
    for other in (b, c):
        assert all(torch.equal(t, other.state_dict()[k]) for k, t in a.state_dict().items())
    assert a.config.conversion == {**vars(Conversion(**kw)), "latent_norm": "none"}   # recorded as completed
    a.save_pretrained(tmp_path / "s")
    assert Transformer.from_pretrained(tmp_path / "s").config.conversion == a.config.conversion  # config.json
    with pytest.raises(TypeError, match="kv_rnak: not a Conversion setting"):
        upcycle(src, kv_rnak=12, q_rank=24)
    with pytest.raises(ValueError, match="give exactly one of kv_rank"):
        upcycle(src, q_rank=24)                                        # upcycle completes no r_kv itself ...
    assert Conversion(q_rank=24).checked(src.config).kv_rank == min(src.config.dim, 2 * src.config.n_kv_heads *
                                                                    src.config.head_dim)  # ... the command lines do
