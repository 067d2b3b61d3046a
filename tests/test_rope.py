"""RoPE: Llama 3 frequency scaling against Meta's published reference formula, and the rotate-half layout."""
import math

import pytest
import torch
from torch.testing import assert_close

from model import apply_rope, rope_cos_sin, rope_inv_freq


def meta_apply_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Meta's reference (meta-llama/llama-models, llama3 apply_scaling), a per-frequency scalar loop."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


# Llama 3.1-8B (head_dim 128, factor 8) and Llama 3.2-1B/3B (head_dim 64/128, factor 32), theta 500000
@pytest.mark.parametrize("dim,factor", [(128, 8.0), (64, 32.0), (128, 32.0), (32, 32.0)])
def test_llama3_scaling_matches_meta_formula(dim, factor):
    scaling = dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    base = rope_inv_freq(dim, 500000.0)
    ours = rope_inv_freq(dim, 500000.0, scaling)
    ref = torch.tensor(meta_apply_scaling(base.tolist(), factor, 1.0, 4.0, 8192), dtype=torch.float32)
    assert_close(ours, ref, rtol=1e-6, atol=0)
    # all three regimes occur: kept (high freq), divided by factor (low freq), and smoothed in between
    ratio = base / ours
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(factor)).any()
    assert ((ratio > 1.001) & (ratio < factor * 0.999)).any()


def test_llama3_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    cfg = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64,
                                   rope_parameters=dict(rope_theta=500000.0, **scaling))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert_close(rope_inv_freq(64, 500000.0, scaling), ref.float(), rtol=1e-6, atol=0)


def test_rotate_half_layout_and_relative_position():
    """Dim i pairs with i + D/2; scores depend only on the relative position."""
    D = 8
    inv = rope_inv_freq(D, 10000.0)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    def at(x, p):
        cos, sin = rope_cos_sin(inv, torch.tensor([p]))
        return apply_rope(x, cos, sin)
    # a rotation preserves the norm of each (i, i + D/2) pair
    r = at(q, 7)[0, 0, 0]
    pair_norm = lambda v: v[: D // 2] ** 2 + v[D // 2:] ** 2
    assert_close(pair_norm(r), pair_norm(q[0, 0, 0]))
    s1 = (at(q, 10) * at(k, 3)).sum()
    s2 = (at(q, 27) * at(k, 20)).sum()
    assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s1, (at(q, 10) * at(k, 4)).sum())
