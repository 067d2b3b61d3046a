"""The latent decode (ops.latent_attention): equal to the einsum reference for several ranks, d_qk / d_r splits
and hybrids; ops.attend (a value narrower than the query, padded on CPU) equal to the reference, gradients too; one SDPA call reading the latent cache; the compiled decode step equals eager."""
import pytest
import torch
from torch.testing import assert_close

from conftest import mla_kw, random_model, tiny_config
from ops import attend, latent_attention
from model import MLAttention


def reference(q, kv, r_kv, scale, mask):
    """Absorbed attention by hand: scores against the whole cached row, values = its first r_kv numbers."""
    s = torch.einsum("bthd,bsd->bhts", q, kv).float() * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bsr->bthr", p, kv[..., :r_kv].float())


@pytest.mark.parametrize("r_kv,d_r,T,S", [(12, 8, 1, 20), (5, 4, 3, 9), (64, 32, 1, 100), (8, 16, 4, 4)])
def test_latent_attention_equals_reference(r_kv, d_r, T, S):
    torch.manual_seed(0)
    B, H = 2, 6
    q, kv = torch.randn(B, T, H, r_kv + d_r), torch.randn(B, S, r_kv + d_r)
    pos = torch.arange(S - T, S)
    mask = torch.arange(S)[None, :] <= pos[:, None]
    out = latent_attention(q, kv, r_kv, 0.3, mask)
    assert out.shape == (B, T, H, r_kv)
    assert_close(out, reference(q, kv, r_kv, 0.3, mask), rtol=1e-5, atol=1e-5)
    assert_close(latent_attention(q, kv, r_kv, 0.3), out)                # default mask: the causal one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_with_a_narrower_value_equals_reference(dtype, masked):
    torch.manual_seed(0)
    B, H, T, d, d_v = 2, 3, 7, 12, 5                                  # MLA's shape: d_v < d_qk + d_r
    q, k, v = (torch.randn(B, H, T, n, dtype=dtype, requires_grad=True) for n in (d, d, d_v))
    mask = torch.rand(T, T) < 0.7
    mask |= torch.eye(T, dtype=torch.bool)                            # every row sees something
    kw = dict(attn_mask=mask) if masked else dict(is_causal=True)
    out = attend(q, k, v, scale=0.4, **kw)
    allowed = mask if masked else torch.ones(T, T, dtype=torch.bool).tril()
    p = (torch.einsum("bhtd,bhsd->bhts", q, k) * 0.4).masked_fill(~allowed, float("-inf")).softmax(-1)
    ref = torch.einsum("bhts,bhsd->bhtd", p, v)
    assert out.shape == (B, H, T, d_v)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b, **tol)


@pytest.mark.parametrize("kw", [mla_kw([0, 1, 2, 3], kv_rank=[3, 7, 12, 20], d_qk=4, d_r=12),
                                mla_kw([1, 2], q_rank=[8, 30], kv_rank=[16, 2], d_qk=12, d_r=4),
                                mla_kw([3], latent_norm=True)])
def test_decode_paths_agree(kw):
    m = random_model(tiny_config(**kw))
    prompt = torch.randint(0, m.config.vocab_size, (2, 5))
    outs = {}
    for path in ("naive", "absorbed", "latent"):
        for b in m.model.layers:
            if isinstance(b.self_attn, MLAttention):
                b.self_attn.path = path
        outs[path] = m.generate(prompt, 12)
        m.clear_caches()
    assert torch.equal(outs["latent"], outs["naive"]) and torch.equal(outs["absorbed"], outs["naive"])


def test_compiled_decode_equals_eager():
    torch._dynamo.reset()
    m = random_model(tiny_config(**mla_kw([0, 2], kv_rank=[6, 10])))
    prompt = torch.randint(0, m.config.vocab_size, (2, 6))
    m.setup_caches(2, 16)
    m(prompt, input_pos=torch.arange(6))
    nxt = torch.randint(0, m.config.vocab_size, (2, 1))
    eager = m.decode_step(nxt, torch.tensor([6]))
    m.setup_caches(2, 16)          # same shape: the same buffers, which the compiled step then reuses
    m(prompt, input_pos=torch.arange(6))
    compiled = m.compiled_decode_step()(nxt, torch.tensor([6]))
    assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    m.clear_caches()
    assert torch.equal(m.generate(prompt, 10, compile=True), m.generate(prompt, 10))
