"""Mamba2 (mamba2.py): the chunked SSD scan equals the sequential recurrence (values and gradients, several chunk
sizes, lengths that are not a multiple of the chunk, with and without a starting state); prefill + decode equals
the full forward for Mamba2 and for mixed GQA / MLA / Mamba2 models; the compiled decode equals eager; the cache
is the size it says; bad shapes are refused."""
import pytest
import torch
from torch.testing import assert_close

from conftest import mla_kw, random_model, tiny_config
from mamba2 import Mamba2, segsum, ssd_chunked, ssd_sequential
from model import ModelConfig, Transformer


def scan_inputs(b=2, T=37, H=4, P=3, N=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(r(b, T, H))
    A = -torch.rand(H, generator=g, dtype=dtype) * 3
    return r(b, T, H, P), dt, A, r(b, T, H, N), r(b, T, H, N), r(b, H, P, N)


def test_segsum_is_the_masked_sum():
    a = torch.randn(3, 6, dtype=torch.float64)
    out = segsum(a)
    for i in range(6):
        for j in range(6):
            want = a[:, j + 1:i + 1].sum(-1) if j <= i else torch.full((3,), float("-inf"), dtype=torch.float64)
            assert torch.equal(out[:, i, j], want) or torch.allclose(out[:, i, j], want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("T", [1, 7, 16, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_sequential(chunk, T, with_state):
    x, dt, A, B, C, S0 = scan_inputs(T=T)
    S0 = S0 if with_state else None
    y1, s1 = ssd_sequential(x, dt, A, B, C, S0)
    y2, s2 = ssd_chunked(x, dt, A, B, C, chunk, S0)
    assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    assert_close(s2, s1, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [4, 10])
def test_chunked_gradients_equal_sequential(chunk):
    inputs = [t.requires_grad_() for t in scan_inputs(T=23)]
    w_y, w_s = torch.randn(2, 23, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, 5, dtype=torch.float64)
    grads = []
    for fn in (lambda *a: ssd_sequential(*a[:5], a[5]), lambda *a: ssd_chunked(*a[:5], chunk, a[5])):
        y, s = fn(*inputs)
        grads.append(torch.autograd.grad((y * w_y).sum() + (s * w_s).sum(), inputs))
    for g1, g2 in zip(*grads):
        assert_close(g2, g1, rtol=1e-9, atol=1e-9)


def test_scan_is_linear_attention_with_decay():
    """The unrolled recurrence: y_t = sum_{s<=t} (C_t . B_s) exp(sum_{s<k<=t} dt_k A) dt_s x_s."""
    x, dt, A, B, C, _ = scan_inputs(T=9)
    a = dt * A                                                          # (b, T, H)
    cum = a.cumsum(1)
    decay = torch.exp(cum[:, :, None] - cum[:, None, :])                # (b, t, s, H)
    decay = decay * torch.ones(9, 9, dtype=torch.float64).tril()[None, :, :, None]
    want = torch.einsum("bthn,bshn,btsh,bsh,bshp->bthp", C, B, decay, dt, x)
    assert_close(ssd_chunked(x, dt, A, B, C, 4)[0], want, rtol=1e-10, atol=1e-10)


def hybrid_cfg(**kw):
    return tiny_config(mamba_layers=(1, 3), ssm_chunk=8, **mla_kw([2]), **kw)


@pytest.mark.parametrize("cfg", [tiny_config(mamba_layers=(0, 1, 2, 3), ssm_chunk=4), hybrid_cfg()],
                         ids=["all-mamba2", "gqa+mla+mamba2"])
def test_prefill_then_decode_equals_full_forward(cfg):
    m = random_model(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 30))
    full = m(idx)
    m.setup_caches(2, 40, dtype=torch.float64)
    steps = [m(idx[:, :13], input_pos=torch.arange(13))]               # a prefill of 13 (not a multiple of 4 or 8)
    steps.append(m(idx[:, 13:17], input_pos=torch.arange(13, 17)))     # a chunked prefill continuing the state
    steps += [m(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(17, 30)]
    assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    # a new sequence in the same caches starts from a zero state: no reset needed
    assert_close(m(idx[:1].expand(2, -1)[:, :30], input_pos=torch.arange(30)), full[:1].expand(2, -1, -1),
                 rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_used_cache_gives_what_a_fresh_one_does_whatever_it_holds(poison):
    # GQA (layer 0), Mamba2 (1, 3) and MLA (2) caches, each planted with NaN / Inf everywhere: a Mamba2 state
    # cleared by a multiply by 0, or a masked stale value entering P @ V as 0 x NaN, would poison the new sequence
    cfg = hybrid_cfg()
    m = random_model(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    m.setup_caches(2, 40, dtype=torch.float64)
    fresh = [m(idx[:, :7], input_pos=torch.arange(7))]
    fresh += [m(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(7, 12)]
    kinds = set()
    for block in m.model.layers:
        kinds.add(type(block.mixer.cache).__name__)
        for b in block.mixer.cache.buffers():
            b.fill_(poison)
    assert kinds == {"KVCache", "LatentCache", "SSMCache"}
    again = [m(idx[:, :7], input_pos=torch.arange(7))]
    again += [m(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(7, 12)]
    assert torch.isfinite(torch.cat(again, 1)).all()
    assert_close(torch.cat(again, 1), torch.cat(fresh, 1), rtol=1e-12, atol=1e-12)
    # generate() with a one-token prompt (no prefill to clear the rest) starts from clean caches too
    want = m.generate(idx[:, :1], 6)
    for block in m.model.layers:
        for b in block.mixer.cache.buffers():
            b.fill_(poison)
    assert torch.equal(m.generate(idx[:, :1], 6), want)


def test_generate_matches_greedy_by_full_forwards():
    m = random_model(hybrid_cfg())
    prompt = torch.randint(0, 96, (2, 5))
    out = m.generate(prompt, 8)
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_compiled_decode_equals_eager():
    torch._dynamo.reset()
    m = random_model(hybrid_cfg())
    prompt = torch.randint(0, 96, (2, 6))
    m.setup_caches(2, 16)
    m(prompt, input_pos=torch.arange(6))
    nxt = torch.randint(0, 96, (2, 1))
    eager = m.decode_step(nxt, torch.tensor([6]))
    m(prompt, input_pos=torch.arange(6))   # the same state again (a sequence from 0 starts from zeros)
    compiled = m.compiled_decode_step()(nxt, torch.tensor([6]))
    assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    m.clear_caches()
    assert torch.equal(m.generate(prompt, 10, compile=True), m.generate(prompt, 10))


def test_cache_bytes_per_sequence():
    cfg = hybrid_cfg()
    m = Transformer(cfg)
    H, d_h, n_kv = cfg.n_heads, cfg.head_dim, cfg.n_kv_heads
    conv = (H * d_h + 2 * n_kv * d_h) * (cfg.ssm_d_conv - 1)               # numbers in the conv window
    state = H * d_h * d_h                                                 # headdim = d_state = d_h
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        assert m.state_bytes(3, dtype) == 2 * 3 * (conv * size + state * 4)   # 2 Mamba2 layers; the state in fp32
        per_token = 2 * n_kv * d_h + (12 + 8)                               # one GQA layer, one MLA (r_kv 12 + d_r 8)
        assert m.kv_cache_elements_per_token() == per_token
        assert m.kv_cache_bytes(3, 50, dtype) == per_token * 3 * 50 * size + m.state_bytes(3, dtype)
        m.setup_caches(3, 50, dtype=dtype)
        assert m.allocated_cache_bytes() == m.kv_cache_bytes(3, 50, dtype)
        m.clear_caches()
    assert m.state_bytes(1) == Transformer(hybrid_cfg(max_seq_len=4096)).state_bytes(1)  # not the context's
    from evaluate import kv_report
    rep = kv_report(m, context=1000)
    assert rep["state_bytes"] == m.state_bytes(1) and rep["bytes"] == m.kv_cache_bytes(1, 1000)
    assert rep["elements_per_token_per_layer"] == [128, 0, 20, 0]


def test_checkpoint_round_trip(tmp_path):
    m = random_model(hybrid_cfg(ssm_d_conv=3))
    m.save_pretrained(tmp_path / "h")
    import json
    hf = json.loads((tmp_path / "h" / "config.json").read_text())
    assert hf["model_type"] == "llama_hybrid" and hf["layer_types"] == ["gqa", "mamba2", "mla", "mamba2"]
    back = Transformer.from_pretrained(tmp_path / "h")
    assert back.config == m.config
    for (k, a), (k2, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    idx = torch.randint(0, 96, (1, 12))
    assert torch.equal(back(idx), m(idx))


def test_bad_shapes_and_layer_lists_are_refused():
    with pytest.raises(ValueError, match="does not divide"):
        tiny_config(mamba_layers=(1,), ssm_d_xb=24)                     # 24 not a multiple of d_state 16
    with pytest.raises(ValueError, match="does not divide"):
        tiny_config(mamba_layers=(1,), ssm_d_inner=96, ssm_d_xb=64)     # 96 not a multiple of 64
    with pytest.raises(ValueError, match="distinct indices"):
        tiny_config(mamba_layers=(1, 1))
    with pytest.raises(ValueError, match="distinct indices"):
        tiny_config(mamba_layers=(4,))
    with pytest.raises(ValueError, match="both mla_layers and mamba_layers"):
        tiny_config(mamba_layers=(2,), **mla_kw([2]))
    with pytest.raises(ValueError, match="ssm_d_conv"):
        Mamba2(16, 16, 16, 16, d_conv=0)
    assert ModelConfig.from_hf({**tiny_config(mamba_layers=(0,)).to_hf()}).mamba_layers == (0,)
    with pytest.raises(ValueError, match="Mamba2: the DeepSeek-V3 format"):  # no engine format holds a hybrid
        random_model(hybrid_cfg()).save_pretrained("/nonexistent/never-written", fmt="deepseek")
