"""svd_init's init="rorope": the shared RoPE key's algebra (a cross-head mix commutes with RoPE; MQA is exact), the
whitened factorisation against plain SVD, the budget allocation, the recorded rotary ladder, reproducibility, the
errors for bad input, and (on the real stories260K checkpoint) that it beats Algorithm 1 at init."""
import json
import os

import pytest
import torch
from torch.testing import assert_close

from conftest import random_model, tiny_config
from data import calibration_ids
from model import Transformer, apply_rope, rope_cos_sin, rope_inv_freq
from rorope import (calib_kl, calib_logits, calibrate, head_logits, _rorope_layer, _truncate, _weighted_svd,
                    allocate_ranks, refit_values, rope_groups, rope_pairs)
from svd_init import kl_per_token, teacher_text, upcycle
from tokenizer import Tokenizer

SFT = ["assets/data/sft/alpaca_en_demo.json"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def calib_for(model, n=8, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, T), generator=g)


def test_cross_head_orthogonal_mix_commutes_with_rope():
    """RoPE rotates pair (i, i + d_h/2) of every head by the same angle; mixing heads with an orthogonal U applied
    alike to both dims of each pair commutes with it (what keeps the shared key rotating exactly)."""
    torch.manual_seed(0)
    T, n_kv, d_h = 11, 4, 16
    k = torch.randn(1, T, n_kv, d_h, dtype=torch.float64)
    cos, sin = rope_cos_sin(rope_inv_freq(d_h, 10000.0), torch.arange(T))
    U = torch.linalg.qr(torch.randn(n_kv, n_kv, dtype=torch.float64))[0]
    mix = lambda x: torch.einsum("mj,btjd->btmd", U, x)
    assert_close(apply_rope(mix(k), cos.double(), sin.double()), mix(apply_rope(k, cos.double(), sin.double())),
                 rtol=0, atol=1e-12)
    # and a mix that treats the two dims of a pair differently does not commute: the test can fail
    U2 = torch.linalg.qr(torch.randn(n_kv, n_kv, dtype=torch.float64))[0]
    half = lambda x: torch.cat([mix(x[..., :d_h // 2]), torch.einsum("mj,btjd->btmd", U2, x[..., d_h // 2:])], -1)
    assert (apply_rope(half(k), cos.double(), sin.double()) - half(apply_rope(k, cos.double(), sin.double()))
            ).abs().max() > 1e-3


@pytest.mark.parametrize("ingredients", [dict(), dict(whiten=False, weight_errors=False)])
def test_mqa_source_at_full_rank_is_exact(ingredients):
    """n_kv = 1: the one key head IS the shared RoPE key, nothing is left unrotated; at full ranks and d_r = d_h the
    MLA model computes the source's logits (float64)."""
    cfg = tiny_config(n_kv_heads=1)
    src = random_model(cfg).double()
    student = upcycle(src, init="rorope", q_rank=64, kv_rank=32, qk_rope_dim=16, calib=calib_for(src),
                      **ingredients).eval()
    idx = calib_for(src, 2, 40, seed=1)
    assert student.config.qk_nope_dim == 16 and student.config.qk_rope_dim == 16
    assert_close(student(idx), src(idx), rtol=0, atol=1e-9)
    # with fewer RoPE dims the dropped frequencies are scored unrotated: no longer exact
    lossy = upcycle(src, init="rorope", q_rank=64, kv_rank=32, qk_rope_dim=8, calib=calib_for(src)).eval()
    assert (lossy(idx) - src(idx)).abs().max() > 1e-3


def _act_error(X, W, P, B):
    return (X @ (W - P @ B)).pow(2).sum().item()


def test_whitened_factorisation_beats_plain_svd_on_anisotropic_inputs():
    torch.manual_seed(0)
    d, out, r, N = 24, 16, 5, 4000
    W = torch.randn(d, out, dtype=torch.float64)
    X = torch.randn(N, d, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)  # anisotropic
    C = X.T @ X / N
    plain = _truncate(W, C, None, _weighted_svd(W, C, None, False), r, False)
    white = _truncate(W, C, None, _weighted_svd(W, C, None, True), r, True)
    e_plain, e_white = _act_error(X, W, *plain), _act_error(X, W, *white)
    assert e_white < 0.5 * e_plain
    # it is the optimum: E||X ΔW||² is the discarded energy of C^½ W
    s = _weighted_svd(W, C, None, True)[1]
    assert_close(e_white / N, s[r:].pow(2).sum().item(), rtol=1e-9, atol=0)
    # isotropic inputs (C = I): the same error as plain SVD
    I = torch.eye(d, dtype=torch.float64)
    P1, B1 = _truncate(W, I, None, _weighted_svd(W, I, None, False), r, False)
    P2, B2 = _truncate(W, I, None, _weighted_svd(W, I, None, True), r, True)
    assert_close(P2 @ B2, P1 @ B1, rtol=0, atol=1e-10)
    # whitened, S and V come from the Gram matrix's eigendecomposition: the same factors as the SVD of C^½ W G
    G = torch.randn(out, out, dtype=torch.float64)
    e, Q = torch.linalg.eigh(C)
    root = (Q * e.sqrt()) @ Q.T
    by_svd = _truncate(W, C, G, torch.linalg.svd(root @ W @ G, full_matrices=False), r, True)
    by_gram = _truncate(W, C, G, _weighted_svd(W, C, G, True), r, True)
    scale = (by_svd[0] @ by_svd[1]).abs().max().item()
    assert_close(by_gram[0] @ by_gram[1], by_svd[0] @ by_svd[1], rtol=0, atol=1e-9 * scale)
    assert_close(_weighted_svd(W, C, G, True)[1], torch.linalg.svdvals(root @ W @ G), rtol=1e-9, atol=0)
    # the up factor from a Gram matrix already computed (the query's, shared with layer_moments): the same factors
    gram = W.T @ C @ W
    usv = _weighted_svd(W, C, None, True, gram)
    P3, B3 = _truncate(W, C, None, usv, r, True, gram)
    P4, B4 = _truncate(W, C, None, usv, r, True)
    assert_close(P3, P4, rtol=0, atol=0)
    assert_close(B3, B4, rtol=0, atol=1e-10 * B4.abs().max().item())
    # and an unwhitened SVD gives other factors: the check can fail
    wrong = _truncate(W, C, G, torch.linalg.svd(W @ G, full_matrices=False), r, True)
    assert (wrong[0] @ wrong[1] - by_svd[0] @ by_svd[1]).abs().max().item() > 1e-3 * scale


def test_budget_allocation_is_exact_and_beats_uniform():
    flat = torch.linspace(1.0, 0.9, 20, dtype=torch.float64)         # every rank is worth keeping
    steep = 0.5 ** torch.arange(20, dtype=torch.float64)             # two ranks carry it all
    spectra = {0: flat, 1: steep, 2: flat.clone()}
    err = lambda ranks: sum(spectra[i][r:].pow(2).sum().item() for i, r in ranks.items())
    for total in (3, 17, 30, 45):
        ranks = allocate_ranks(spectra, total)
        assert sum(ranks.values()) == total and min(ranks.values()) >= 1
        uniform = {i: total // 3 for i in spectra}
        assert err(ranks) <= err(uniform) + 1e-12
    assert err(allocate_ranks(spectra, 30)) < 0.9 * err({i: 10 for i in spectra})
    assert allocate_ranks(spectra, 60) == {0: 20, 1: 20, 2: 20}           # capped by the spectra's length
    with pytest.raises(ValueError, match="cannot give 3 layers one each"):
        allocate_ranks(spectra, 2)


@pytest.mark.parametrize("budget", [0.5, 0.25, 100])
def test_the_cache_never_exceeds_the_budget(budget):
    src = random_model(tiny_config())
    student = upcycle(src, init="rorope", kv_budget=budget, calib=calib_for(src, 16, 32))
    allowed = int(budget * src.kv_cache_elements_per_token()) if budget <= 1 else budget
    assert student.kv_cache_elements_per_token() <= allowed
    assert student.kv_cache_elements_per_token() >= allowed - src.config.n_layers  # and it is used, up to rounding


@pytest.mark.parametrize("ladder", ["highest", "every"])
def test_recorded_rope_ladder_reloads_to_the_same_logits(tmp_path, ladder):
    src = random_model(tiny_config(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=16)))
    student = upcycle(src, init="rorope", q_rank=64, kv_rank=16, qk_rope_dim=8, rope_ladder=ladder, rope_fold=1,
                      calib=calib_for(src)).eval()
    pairs, _ = rope_pairs(16, 8, ladder)
    # the d_r-dim ladder computes exactly the source frequencies that were kept (llama3 scaling included)
    assert_close(student.inv_freq_mla, src.inv_freq_gqa[pairs], rtol=1e-6, atol=0)
    if ladder == "highest":
        assert pairs == [0, 1, 2, 3] and student.config.qk_rope_theta == pytest.approx(10000.0 ** 0.5)
    else:
        assert pairs == [0, 2, 4, 6] and student.config.qk_rope_theta == 0.0
    student.save_pretrained(str(tmp_path / "s"))
    hf = json.load(open(tmp_path / "s" / "config.json"))
    assert ("qk_rope_theta" in hf) == (ladder == "highest")
    back = Transformer.from_pretrained(str(tmp_path / "s")).eval()
    idx = calib_for(src, 2, 40, seed=3)
    assert torch.equal(back.inv_freq_mla, student.inv_freq_mla)
    assert_close(back(idx), student(idx), rtol=0, atol=0)


def test_same_calibration_seed_gives_the_same_model(tmp_path):
    tok = Tokenizer.from_name("bytes")
    ids = lambda seed: calibration_ids([os.path.join(ROOT, s) for s in SFT], tok, str(tmp_path), 512, 64, seed,
                                       log=lambda *a: None)
    a, b, c = ids(0), ids(0), ids(1)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    src = random_model(tiny_config(vocab_size=512))
    m1, m2 = (upcycle(src, init="rorope", kv_budget=0.5, calib=x).state_dict() for x in (a, b))
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    m3 = upcycle(src, init="rorope", kv_budget=0.5, calib=c).state_dict()
    assert any(not torch.equal(m1[k], m3[k]) for k in m1 if k in m3 and m1[k].shape == m3[k].shape)


def test_bad_input_is_named():
    src = random_model(tiny_config())
    ok = calib_for(src)
    cases = [
        (dict(kv_budget=0.5), "calib must be a non-empty LongTensor"),
        (dict(kv_budget=0.5, calib=ok.float()), "calib must be a non-empty LongTensor"),
        (dict(kv_budget=0.5, calib=ok + 1000), "outside \\[0, 96\\)"),
        (dict(kv_rank=16, calib=ok[:1, :4]), "calibration has 4 tokens, fewer than the rank 64"),
        (dict(kv_budget=0.01, calib=ok), "below what d_r = 2 and r_kv = 1 alone cost"),
        (dict(kv_budget=0.1, qk_rope_dim=16, calib=ok), "below what d_r = 16 and r_kv = 1"),
        (dict(kv_rank=8, qk_rope_dim=18, calib=ok), "qk_rope_dim=18 > d_h = 16"),
        (dict(kv_rank=8, qk_rope_dim=6, rope_ladder="every", calib=ok), "rope_ladder='every' needs d_r/2 to divide"),
        (dict(kv_rank=8, rope_ladder="lowest", calib=ok), "rope_ladder='lowest'"),
        (dict(kv_budget=0.5, rank_alloc="greedy", calib=ok), "rank_alloc='greedy'"),
        (dict(kv_rank=8, qk_nope_dim=8, calib=ok), "qk_nope_dim must be d_h = 16"),
        (dict(kv_rank=8, kv_budget=0.5, calib=ok), "kv_budget or kv_rank"),
        (dict(kv_budget=1.5, calib=ok), "kv_budget=1.5"),
        (dict(kv_budget=5000, calib=ok), "kv_budget=5000"),
        (dict(kv_rank=8, rope_fold=3, calib=ok), "rope_fold=3: use one of 1, 2, 4, 8"),
        (dict(kv_rank=8, qk_rope_dim=4, rope_fold=2, calib=ok), r"c = d_h/d_r = 4.*rope_fold in \[1, 4, 8\]"),
        (dict(kv_rank=8, qk_rope_dim=6, rope_fold=2, calib=ok), "c = d_h/d_r = 2.66667"),
        (dict(kv_budget=15, rope_fold=2, calib=ok), r"d_r \[2\] fit this budget"),
        (dict(kv_rank=8, refit="yes", calib=ok), "refit='yes': True"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            upcycle(src, init="rorope", **kw)
    with pytest.raises(ValueError, match="init='svd' has none"):
        upcycle(src, init="svd", kv_rank=8, rope_fold=2)


@pytest.mark.parametrize("d_r, fold", [(16, 1), (8, 1), (16, 2), (8, 2), (8, 4), (4, 8)])
def test_folded_key_splits_every_key_exactly(d_r, fold):
    """Each source key k_j,i (head j, frequency i) = sum_t A[j,i,t] k_r,t + its remainder, the remainder going to the
    no-RoPE part: exact for any fold, so folding approximates only the rotation. A group's coefficients stay inside
    the group; without folding each slot reads its own frequency alone."""
    torch.manual_seed(0)
    cfg = tiny_config()  # d 64, 8 heads, 4 KV heads, d_h 16
    d, H, n_kv, d_h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    X = torch.randn(500, d, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    C, mean = X.T @ X / len(X), X.mean(0)
    W_Q, W_K, W_V = (torch.randn(d, n, dtype=torch.float64) for n in (H * d_h, n_kv * d_h, n_kv * d_h))
    W_O = torch.randn(H * d_h, d, dtype=torch.float64)
    pairs = rope_pairs(d_h, d_r, "every" if fold > 1 else "highest")[0]
    W_KR, A, W, _ = _rorope_layer(W_Q, W_K, W_V, W_O, C, mean, cfg, pairs, True, 1.0, fold)
    half, k = d_h // 2, d_r // 2
    K_res = W[:, :n_kv * d_h].view(d, n_kv, d_h)
    rebuilt = K_res + torch.cat([torch.einsum("jit,dt->dji", A, W_KR[:, :k]),
                                 torch.einsum("jit,dt->dji", A, W_KR[:, k:])], -1)
    assert_close(rebuilt, W_K.view(d, n_kv, d_h), rtol=0, atol=1e-10 * W_K.abs().max().item())
    assert torch.equal(W[:, n_kv * d_h:], W_V)  # the values are untouched
    for freqs, slots in rope_groups(d_h, pairs, fold):
        outside = torch.ones(half, dtype=torch.bool)
        outside[freqs] = False
        assert A[:, outside][..., slots].abs().sum() == 0 and A[:, freqs][..., slots].abs().max() > 0
        if fold == 1:
            assert freqs == [pairs[slots[0]]]
    if fold > 1:  # a group's top components (plain PCA): at least the energy of any one head's kept pairs (Ky Fan)
        energy = lambda cols: torch.einsum("dc,de,ec->", cols, C, cols).item()
        heads = [energy(W_K.view(d, n_kv, d_h)[:, j, pairs + [i + half for i in pairs]]) for j in range(n_kv)]
        assert energy(W_KR) >= max(heads) * (1 - 1e-12)


def test_folding_is_chosen_recorded_and_exported(stories, tmp_path):
    """On trained weights (stories260K) at a quarter of the cache: the calibration KL picks the fold, which is never
    worse on held-out teacher text than no folding here; config.json records it; the DeepSeek-V3 export computes
    the same function in transformers (folding changes no format: a standard rotary at the source's theta)."""
    src = stories.double()
    calib, held = teacher_text(src, 16, 128, 0), teacher_text(src, 8, 128, 1)
    plain = upcycle(src, init="rorope", kv_budget=0.25, calib=calib, rope_fold=1).eval()
    folded = upcycle(src, init="rorope", kv_budget=0.25, calib=calib).eval()
    kl = lambda m: kl_per_token(src, m, held)[0]
    assert folded.config.rope_fold in (1, 2, 4, 8)
    assert kl(folded) <= kl(plain) * 1.05
    forced = upcycle(stories, init="rorope", kv_budget=0.25, calib=calib, rope_fold=2, latent_norm="kv").eval()
    assert forced.config.rope_fold == 2 and forced.config.qk_rope_theta == 0.0
    forced.save_pretrained(str(tmp_path / "s"))
    assert json.load(open(tmp_path / "s" / "config.json"))["qk_rope_fold"] == 2
    back = Transformer.from_pretrained(str(tmp_path / "s")).eval()
    with torch.no_grad():  # float32, as the export tests of test_deepseek.py
        ours = forced(held)
        scale = ours.abs().max().item()
        assert back.config.rope_fold == 2 and (back(held) - ours).abs().max().item() <= 1e-5 * scale
        transformers = pytest.importorskip("transformers")
        forced.save_pretrained(str(tmp_path / "ds"), fmt="deepseek")
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ds"), dtype=torch.float32).eval()
        assert (ref(held).logits - ours).abs().max().item() <= 1e-5 * scale


def test_error_weights_unset_keep_the_better_of_with_and_without(stories):
    """weight_errors=None builds the chosen shape with and without the cost weights and keeps the one with the lower
    KL on the calibration's first 4 sequences: the result is one of the two forced students, the better one there."""
    src = stories
    calib = teacher_text(src, 8, 128, 0)
    kw = dict(init="rorope", kv_rank=8, qk_rope_dim=4, rope_fold=1, calib=calib)
    auto, cost, plain = (upcycle(src, weight_errors=w, **kw).eval() for w in (None, True, False))
    kl = lambda m: kl_per_token(src, m, calib[:4])[0]
    same = lambda a, b: all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert same(auto, cost) != same(auto, plain)
    assert kl(auto) == min(kl(cost), kl(plain))


def test_refit_solves_its_ridge_regressions_on_each_layers_own_inputs():
    """rorope.refit_values: after it, each converted layer's W_O is the ridge regression (toward its init W0) from the
    student's head outputs to the teacher's attention output, each model on its own residual stream (the student's
    through the layers already refitted: sequential), and each head's W_UV the one from its attention-weighted latent
    to the teacher's head output. Checked from outside the refit's loop (forward_hidden's layer states) by the
    normal equations uᵀ(u W - y) + lam (W - W0) = 0 over all calibration sequences."""
    src = random_model(tiny_config()).double()
    calib = calib_for(src, 16, 32)
    student = upcycle(src, init="rorope", q_rank=64, kv_rank=8, qk_rope_dim=8, calib=calib, refit=False).eval()
    layers = list(range(src.config.n_layers))
    init = {k: v.clone() for k, v in student.state_dict().items()}

    def residuals(student, ridge):  # relative normal-equation residuals, per layer: W_O, then each head's W_UV
        rope_s, rope_t = student._rope(torch.arange(32)), src._rope(torch.arange(32))
        lam = lambda G: ridge * G.diagonal(dim1=-2, dim2=-1).mean(-1)
        with torch.no_grad():
            hs, ht = student.forward_hidden(calib, layer_states=True), src.forward_hidden(calib, layer_states=True)
        out = []
        for i in layers:
            a, at = student.model.layers[i].self_attn, src.model.layers[i].self_attn
            xs, xt = student.model.layers[i].input_layernorm(hs[i]), src.model.layers[i].input_layernorm(ht[i])
            p = f"model.layers.{i}.self_attn."
            with torch.no_grad():
                u, o = a.heads(xs, rope_s).flatten(2).flatten(0, 1), at.heads(xt, rope_t).flatten(0, 1)
                z = a.mixed_latent(*a.project(xs, rope_s)).transpose(1, 2).flatten(0, 1)       # (N, H, r_kv)
                y = at.o_proj(o.flatten(1))
                G, W_O = u.T @ u, a.o_proj.weight
                g_o = G @ W_O.T - u.T @ y + lam(G) * (W_O - init[p + "o_proj.weight"]).T
                out.append((g_o.norm() / (u.T @ y).norm()).item())
                W_UV = a.W_UV.weight.view(a.H, a.d_v, a.r_kv)
                W0_UV = init[p + "W_UV.weight"].view(a.H, a.d_v, a.r_kv)
                Gz = torch.einsum("nhr,nhs->hrs", z, z)
                for h in range(a.H):
                    g_v = Gz[h] @ W_UV[h].T - z[:, h].T @ o[:, h] + lam(Gz[h]) * (W_UV[h] - W0_UV[h]).T
                    out.append((g_v.norm() / (z[:, h].T @ o[:, h]).norm()).item())
        return out

    before = residuals(student, 1e-4)
    refit_values(student, src, calib, layers, ridge=1e-4)
    after = residuals(student, 1e-4)
    assert min(before) > 1e-3 and max(after) < 1e-8, (before, after)


def test_refit_with_shared_tensors_leaves_the_teacher_alone():
    """upcycle(copy=False) shares the teacher's untouched tensors with the student (convert-and-save); the refit
    writes a new o_proj instead of the shared one, so the teacher's weights and outputs do not change."""
    src = random_model(tiny_config()).double().eval()
    calib = calib_for(src, 8, 32)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    student = upcycle(src, init="rorope", q_rank=64, kv_rank=8, qk_rope_dim=8, calib=calib, copy=False).eval()
    assert all(torch.equal(before[k], v) for k, v in src.state_dict().items())
    o = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(student.state_dict()[o], src.state_dict()[o])  # the student's was refitted


def test_the_calibration_pass_gives_the_teachers_scoring_logits():
    """upcycle takes the teacher's side of the candidates' scores from calibrate's forward (first_hidden, then
    head_logits) instead of a second teacher forward: the same logits as calib_logits, and the refit's teacher
    inputs are the attention inputs of every batch."""
    src = random_model(tiny_config(n_layers=2)).eval()
    calib = calib_for(src, n=6, T=32)
    first, inputs = [], {}
    calibrate(src, calib, [0, 1], batch_size=4, inputs=inputs, first_hidden=first)
    assert len(first) == 1 and first[0].shape == (4, 32, src.config.dim)
    for a, b in zip(head_logits(src, first[0]), calib_logits(src, calib[:4])):
        assert torch.equal(a, b)
    assert [x.shape[0] for x in inputs[1]] == [4, 2]                         # batches of 4, then the rest


def test_bfloat16_scores_rank_candidates_as_float32_does():
    """upcycle ranks its candidates in bfloat16 where the hardware has it (rorope.native_bf16): the score must stay
    the float32 KL to bfloat16's precision (logits and softmax in float32), and order two students as float32 does,
    on any machine (the test forces bfloat16)."""
    src = random_model(tiny_config(n_layers=2)).eval()
    calib = calib_for(src, n=6, T=32)
    layers = list(range(2))
    idx = calib[:4]
    z32, z16 = calib_logits(src, idx), calib_logits(src, idx, bf16=True)
    scores = []
    for kv_rank in (2, 48):  # a worse and a better student
        student = upcycle(src, init="rorope", kv_rank=kv_rank, qk_rope_dim=4, rope_fold=1, calib=calib,
                          refit=False).eval()
        kl32, kl16 = calib_kl(z32, student, idx, layers), calib_kl(z16, student, idx, layers, bf16=True)
        assert abs(kl16 - kl32) < 0.1 * kl32, (kv_rank, kl16, kl32)
        scores.append((kl32, kl16))
    (worse32, worse16), (better32, better16) = scores
    assert better32 < 0.8 * worse32 and better16 < worse16, scores
    # the teacher against itself in bfloat16: a KL far below the students', and not zero (bfloat16 did run)
    self16 = calib_kl(z32, src, idx, [], bf16=True)
    assert 0 < self16 < 0.01 * better32, (self16, better32)


def test_a_llama3_source_can_keep_a_key_of_unscaled_frequencies(monkeypatch):
    """Issue 37: a key of only the frequencies Llama 3's scaling leaves alone needs no rope_scaling in the export
    (vLLM and SGLang would serve any as DeepSeek-YaRN). True: always; None: where the calibration KL costs little
    (svd_init.UNSCALED_SLACK); False: never; an engine aim: always; the refusals name the rule."""
    import warnings
    import svd_init
    from deepseek import export_config
    from errors import BadInput
    from model import ModelConfig
    from svd_init import Conversion
    sc = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=256)
    cfg = tiny_config(rope_theta=500000.0, rope_scaling=sc)             # d_h 16: wavelengths 6, 32, 167, ... vs 64
    assert svd_init.unscaled_count(cfg) == 2 and svd_init.unscaled_count(tiny_config()) is None
    src = random_model(cfg, seed=2)
    kw = dict(init="rorope", kv_budget=0.5, latent_norm="kv", calib=calib_for(src, n=16, T=64))
    s = upcycle(src, rope_unscaled=True, **kw)
    assert (s.config.qk_rope_dim, s.config.rope_fold) == (4, 1)        # frequencies 0 and 1, unfolded
    assert "rope_scaling" not in export_config(s.config)                # the same function in every engine
    free = upcycle(src, rope_unscaled=False, **kw)
    assert free.config.qk_rope_dim > 4 or free.config.rope_fold > 1     # left free, the best key keeps scaled ones
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # the export's YaRN warning
        assert export_config(free.config)["rope_scaling"]["rope_type"] == "llama3"
    monkeypatch.setattr(svd_init, "UNSCALED_SLACK", 1e9)                 # None: taken when it costs little ...
    assert (upcycle(src, **kw).config.qk_rope_dim, upcycle(src, **kw).config.rope_fold) == (4, 1)
    monkeypatch.setattr(svd_init, "UNSCALED_SLACK", -1.0)                # ... else the best candidate, as False
    auto = upcycle(src, **kw)
    assert all(torch.equal(t, free.state_dict()[k]) for k, t in auto.state_dict().items())
    for extra, msg in [(dict(qk_rope_dim=8), r"only the 2 highest frequencies are unscaled.*Fix: qk_rope_dim <= 4"),
                       (dict(rope_fold=2), "unfolded. Fix: rope_ladder='highest' and rope_fold=1"),
                       (dict(init="svd", kv_budget=None, kv_rank=8), "Fix: init='rorope'")]:
        with pytest.raises(BadInput, match=msg):
            upcycle(src, rope_unscaled=True, **{**kw, **extra})
    with pytest.raises(BadInput, match="no Llama 3 rope scaling"):
        upcycle(random_model(tiny_config()), rope_unscaled=True, **kw)
    # aimed at an engine: unscaled by default, d_r the largest power of two within the band (exact zero padding)
    llama1b = ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, vocab_size=96,
                          intermediate_size=128, rope_theta=500000.0,
                          rope_scaling={**sc, "factor": 32.0, "original_max_position_embeddings": 8192})
    c = Conversion(init="rorope", head_size=576, latent_norm="kv").checked(llama1b)
    assert (c.kv_rank, c.qk_rope_dim, c.rope_unscaled) == (512, 16, True)           # 15 unscaled: d_r 16, not 64
    assert Conversion(init="rorope", head_size=576, latent_norm="kv", rope_unscaled=False).checked(
        llama1b).qk_rope_dim == 64
    c = Conversion(init="rorope", kv_budget=0.25, latent_norm="kv", engine="sglang").checked(llama1b)
    assert (c.kv_rank, c.qk_rope_dim) == (240, 16)                       # 256 a layer, SGLang's rule, d_r <= 30
