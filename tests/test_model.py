"""model.py: module shapes, MLA naive == absorbed, incremental decode == full forward, cache sizes, generation."""
import pytest
import torch
from torch.testing import assert_close

from conftest import mla_kw, random_model, tiny_config
from model import Attention, LatentCache, KVCache, MLAttention, ModelConfig, Transformer

B, T = 2, 12

CONFIGS = {
    "gqa": tiny_config(),
    "mla": tiny_config(**mla_kw([0, 1, 2, 3])),
    "hybrid": tiny_config(**mla_kw([1, 3], q_rank=[24, 40], kv_rank=[12, 5])),           # per-layer ranks
    "hybrid_norm_llama3": tiny_config(**mla_kw([0, 2], d_qk=4, d_r=12, latent_norm=True), tie_embeddings=False,
                                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0, original_max_position_embeddings=16)),
}


def test_module_shapes():
    cfg = CONFIGS["hybrid"]
    m = random_model(cfg)
    assert [type(b.self_attn) for b in m.model.layers] == [Attention, MLAttention, Attention, MLAttention]
    a = m.model.layers[3].self_attn  # r_q 40, r_kv 5, d_qk 8, d_r 8, 8 heads of d_v 16
    shapes = {n: tuple(p.weight.shape) for n, p in a.named_children() if hasattr(p, "weight")}
    assert shapes == {"W_DQ": (40, 64), "W_UQ": (8 * 8, 40), "W_QR": (8 * 8, 40), "W_DKV": (5, 64), "W_KR": (8, 64),
                      "W_UK": (8 * 8, 5), "W_UV": (8 * 16, 5), "o_proj": (64, 8 * 16)}
    g = m.model.layers[0].self_attn
    assert (g.q_proj.weight.shape, g.k_proj.weight.shape, g.v_proj.weight.shape) == ((128, 64), (64, 64), (64, 64))
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    assert m(idx).shape == (B, T, cfg.vocab_size)
    assert m.forward_hidden(idx).shape == (B, T, cfg.dim)
    x = torch.randn(B, T, cfg.dim)
    assert m.model.layers[3](x, _rope(m, T)).shape == (B, T, cfg.dim)
    logits, loss = m(idx, targets=idx)
    assert loss.ndim == 0 and torch.isfinite(loss)


def _rope(m, T):
    from model import rope_cos_sin
    pos = torch.arange(T)
    return {"gqa": rope_cos_sin(m.inv_freq_gqa, pos), "mla": rope_cos_sin(m.inv_freq_mla, pos)}


def test_latent_norm_and_tied_head():
    m = random_model(CONFIGS["hybrid_norm_llama3"])
    assert isinstance(m.model.layers[0].self_attn.kv_norm, torch.nn.Module)
    assert "model.layers.0.self_attn.kv_norm.weight" in m.state_dict()
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    t = random_model(CONFIGS["gqa"])
    assert t.lm_head.weight is t.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["mla", "hybrid", "hybrid_norm_llama3"])
def test_mla_naive_equals_absorbed_full_forward(name):
    m = random_model(CONFIGS[name])
    idx = torch.randint(0, m.config.vocab_size, (B, T))
    outs = {}
    for path in ("naive", "absorbed", "latent"):
        for blk in m.model.layers:
            if isinstance(blk.self_attn, MLAttention):
                blk.self_attn.path = path
        outs[path] = m(idx)
    assert_close(outs["absorbed"], outs["naive"], rtol=1e-5, atol=1e-5)
    assert_close(outs["latent"], outs["naive"], rtol=1e-5, atol=1e-5)
    # and the test is not vacuous: the MLA layers do change the output
    assert outs["naive"].abs().max() > 1.0


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("path", ["auto", "naive", "absorbed", "latent"])
def test_incremental_decode_equals_full_forward(name, path):
    m = random_model(CONFIGS[name]).double()  # an exactness claim: float64, so no CPU's rounding can break it
    for blk in m.model.layers:
        if isinstance(blk.self_attn, MLAttention):
            blk.self_attn.path = path
    idx = torch.randint(0, m.config.vocab_size, (B, T))
    full = m(idx)                                               # (B, T, V), no cache
    T0 = 5
    m.setup_caches(B, 20)
    steps = [m(idx[:, :T0], input_pos=torch.arange(T0))]        # prefill
    for t in range(T0, T):                                       # then one token at a time
        steps.append(m(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    m.clear_caches()
    assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)


def test_chunked_prefill_equals_full_forward():
    """Several tokens against a non-empty cache: the mask must be aligned bottom-right (is_causal would be wrong)."""
    m = random_model(CONFIGS["hybrid"])
    idx = torch.randint(0, m.config.vocab_size, (1, T))
    full = m(idx)
    m.setup_caches(1, T)
    a = m(idx[:, :4], input_pos=torch.arange(4))
    b = m(idx[:, 4:], input_pos=torch.arange(4, T))
    assert_close(torch.cat([a, b], 1), full, rtol=1e-5, atol=1e-5)


def test_cache_size_accounting():
    cfg = CONFIGS["hybrid"]                      # GQA layers 0, 2: 2*4*16 = 128; MLA r_kv 12 / 5 + d_r 8
    m = random_model(cfg)
    assert m.kv_cache_elements_per_token() == 128 + (12 + 8) + 128 + (5 + 8)
    for dtype in (torch.float32, torch.bfloat16):
        m.setup_caches(3, 17, dtype=dtype)
        assert m.allocated_cache_bytes() == m.kv_cache_bytes(3, 17, dtype)
        caches = [blk.self_attn.cache for blk in m.model.layers]
        assert isinstance(caches[0], KVCache) and isinstance(caches[1], LatentCache)
        # an MLA layer holds exactly r_kv + d_r numbers per token, nothing per head
        assert sum(b.numel() for b in caches[1].buffers()) == 3 * 17 * (12 + 8)
        assert sum(b.numel() for b in caches[3].buffers()) == 3 * 17 * (5 + 8)
        m.clear_caches()


def test_llama_3_2_1b_cache_ratio():
    """Paper: Llama-3.2-1B with r_kv 64, d_r 32 keeps 9.4% of the cache (96 of 1024 numbers per token and layer)."""
    kw = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
              intermediate_size=8192, max_seq_len=131072, rope_theta=500000.0)
    with torch.device("meta"):
        gqa = Transformer(ModelConfig(**kw))
        mla = Transformer(ModelConfig(**kw, **mla_kw(range(16), q_rank=1424, kv_rank=64, d_qk=32, d_r=32)))
    assert gqa.kv_cache_elements_per_token() == 16 * 1024
    assert mla.kv_cache_elements_per_token() == 16 * 96
    assert round(100 * mla.kv_cache_elements_per_token() / gqa.kv_cache_elements_per_token(), 2) == 9.38
    assert gqa.kv_cache_bytes(1, 1000, torch.bfloat16) == 16 * 1024 * 1000 * 2


@pytest.mark.parametrize("name", ["gqa", "hybrid"])
def test_generate_greedy_matches_full_forward_argmax(name):
    m = random_model(CONFIGS[name])
    prompt = torch.randint(0, m.config.vocab_size, (B, 4))
    out = m.generate(prompt, max_new_tokens=10)
    assert out.shape == (B, 14) and torch.equal(out[:, :4], prompt)
    seq = prompt
    for _ in range(10):                          # the slow way: a full forward per token, no cache
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_eos_and_sampling():
    m = random_model(CONFIGS["hybrid"])
    prompt = torch.randint(0, m.config.vocab_size, (B, 3))
    greedy = m.generate(prompt, 8)
    eos = int(greedy[0, 5])                      # a token row 0 emits at step 3: stop there
    out = m.generate(prompt, 8, eos_id=eos)
    assert (out[0, 5:] == eos).all()             # after eos a row only repeats eos
    assert torch.equal(out[0, :6], greedy[0, :6])
    torch.manual_seed(0)
    a = m.generate(prompt, 8, temperature=1.0, top_k=5)
    torch.manual_seed(0)
    b = m.generate(prompt, 8, temperature=1.0, top_k=5)
    assert torch.equal(a, b)
    # top_k=1 sampling is greedy
    assert torch.equal(m.generate(prompt, 8, temperature=0.7, top_k=1), greedy)
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate(prompt, 1000)


def test_bad_configs():
    with pytest.raises(ValueError, match="one entry per MLA layer"):
        tiny_config(mla_layers=(0, 1), q_rank=(8,), kv_rank=(8, 8), qk_nope_dim=8, qk_rope_dim=8)
    with pytest.raises(ValueError, match="distinct indices"):
        tiny_config(**mla_kw([0, 7]))
    with pytest.raises(ValueError, match="even qk_rope_dim"):
        tiny_config(**mla_kw([0], d_r=3))
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        tiny_config(n_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling type"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    m = random_model(tiny_config())
    with pytest.raises(RuntimeError, match="setup_caches"):
        m(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([0]))
