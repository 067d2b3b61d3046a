"""ops.py: the chunked linear+KL loss equals the naive full-logits formula in value and gradient."""
import pytest
import torch
from torch.testing import assert_close

from ops import linear_kl, naive_linear_kl


def make(N=37, d=16, d_t=24, V=50, seed=0, dtype=torch.float64):
    """float64 by default: the claim is exact equality (up to summation order), which only float64 makes
    independent of the CPU's BLAS kernels."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, d, generator=g, dtype=dtype, requires_grad=True)
    W_s = torch.randn(V, d, generator=g, dtype=dtype, requires_grad=True)
    h_t = torch.randn(N, d_t, generator=g, dtype=dtype)
    W_t = torch.randn(V, d_t, generator=g, dtype=dtype)                              # a wider teacher
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = -100
    w = torch.rand(N, generator=g, dtype=dtype)
    w[5] = w[6] = 0.0                                                                 # padding
    return h_s, W_s, h_t, W_t, y, w


@pytest.mark.parametrize("kl_w,ce_w", [(1.0, 0.0), (0.0, 1.0), (1.0, 0.3)])
@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_chunked_equals_naive_value_and_gradient(kl_w, ce_w, chunk):
    h_s, W_s, h_t, W_t, y, w = make()
    a, stats = linear_kl(h_s, W_s, h_t, W_t, y, w, kl_w, ce_w, chunk)
    ga = torch.autograd.grad(a, (h_s, W_s))
    b = naive_linear_kl(h_s, W_s, h_t, W_t, y, w, kl_w, ce_w)
    gb = torch.autograd.grad(b, (h_s, W_s))
    assert a.dtype == torch.float64
    assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert_close(ga[0], gb[0], rtol=1e-10, atol=1e-10)
    assert_close(ga[1], gb[1], rtol=1e-10, atol=1e-10)
    assert ga[0].abs().sum() > 0
    # stats: unweighted sums over the tokens with weight != 0 (and, for CE and the count, a target)
    lp_s, lp_t = (h_s @ W_s.T).log_softmax(-1), (h_t @ W_t.T).log_softmax(-1)
    kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
    keep = w != 0
    assert_close(stats[0], kl[keep].sum().detach(), rtol=1e-10, atol=1e-10)
    assert stats[3] == (keep & (y >= 0)).sum()


def test_padding_does_not_count():
    h_s, W_s, h_t, W_t, y, w = make()
    a, _ = linear_kl(h_s, W_s, h_t, W_t, y, w, 1.0, 0.5, 8)
    h2 = h_s.detach().clone()
    h2[5] += 100.0                                      # garbage at a padding position
    h2.requires_grad_()
    b, _ = linear_kl(h2, W_s, h_t, W_t, y, w, 1.0, 0.5, 8)
    assert_close(a, b)
    g = torch.autograd.grad(b, h2)[0]
    assert (g[5] == 0).all() and (g[6] == 0).all() and g[7].abs().sum() > 0


def test_ce_only_needs_no_teacher():
    h_s, W_s, _, _, y, w = make()
    a, stats = linear_kl(h_s, W_s, None, None, y, w, 0.0, 1.0, 8)
    assert_close(a, naive_linear_kl(h_s, W_s, None, None, y, w, 0.0, 1.0))
    assert stats[0] == 0 and stats[2] == 0
    with pytest.raises(ValueError, match="teacher"):
        linear_kl(h_s, W_s, None, None, y, w, 1.0, 0.0)


def test_bf16_inputs():
    h_s, W_s, h_t, W_t, y, w = make(dtype=torch.float32)
    bf = lambda t: t.detach().to(torch.bfloat16)
    hs, Ws = bf(h_s).requires_grad_(), bf(W_s).requires_grad_()
    a, _ = linear_kl(hs, Ws, bf(h_t), bf(W_t), y, w, 1.0, 0.0, 8)
    ref = naive_linear_kl(hs.float(), Ws.float(), bf(h_t).float(), bf(W_t).float(), y, w)
    assert a.dtype == torch.float32
    assert_close(a, ref, rtol=2e-2, atol=2e-2)                  # logits in bf16, softmax in fp32
    a.backward()
    assert hs.grad.dtype == torch.bfloat16 and Ws.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_linear_logprobs_equals_naive(chunk):
    from ops import linear_logprobs
    h_s, W_s, _, _, y, w = make()
    a = linear_logprobs(h_s, W_s, y, chunk)
    ref = (h_s @ W_s.T).log_softmax(-1).gather(1, y.clamp(min=0)[:, None])[:, 0] * (y >= 0)
    assert_close(a, ref, rtol=1e-5, atol=1e-5)
    assert a[3] == 0                                                  # target -100
    ga = torch.autograd.grad((a * w).sum(), (h_s, W_s))
    gb = torch.autograd.grad((ref * w).sum(), (h_s, W_s))
    assert_close(ga[0], gb[0], rtol=1e-5, atol=1e-6)
    assert_close(ga[1], gb[1], rtol=1e-5, atol=1e-6)
