"""
Performance-critical pieces, each with a plain reference it is tested against.

    python bench.py          # the benchmarks of these pieces live beside them, in bench.py (it imports the model)

1. linear_kl: the distillation loss from final hidden states, without ever holding the full (N, V) logits.
   The naive loss materialises student and teacher logits in fp32 at once: for a Llama-3 vocabulary (128,256) and a
   micro-batch of 8 x 2048 tokens that is 2 x 8.4 GB, plus their softmaxes and gradients. Here logits are formed one
   chunk of tokens at a time, in forward and again (recomputed) in backward, so the peak extra memory is a few
   (chunk, V) fp32 blocks.
2. linear_logprobs: log p(target) per token from hidden states, the same way (DPO sums them per response).
3. latent_attention: MLA's absorbed attention over the latent cache as ONE multi-query SDPA call. The H heads of
   the T new tokens become H*T query rows against a single key/value head: key = the cached row [c_kv ; k_rope]
   (r_kv + d_r), value = its first r_kv numbers. The cache is read once for all heads; broadcasting a
   (B, 1, S, D) key against (B, H, T, D) queries instead re-reads (or expands) it per head, 10-40x slower on CPU.
"""
import torch
import torch.nn.functional as F

from errors import BadInput


def _acc(x):
    """Softmax and sums in fp32 at least: bf16/fp16 go up to fp32, fp64 (the exactness tests) stays fp64."""
    return x if x.dtype == torch.float64 else x.float()


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _LinearKL(torch.autograd.Function):
    """loss = sum_i w_i (kl_weight KL(p_t,i || p_s,i) + ce_weight CE_i), with p_s = softmax(h_s W_sᵀ),
    p_t = softmax(h_t W_tᵀ) computed chunk by chunk. Gradients flow to h_s and W_s only (the teacher is frozen):
    d loss / d logits_s = w (kl_weight (p_s - p_t) + ce_weight (p_s - onehot(y)))."""

    @staticmethod
    def forward(ctx, h_s, W_s, h_t, W_t, targets, weight, kl_weight, ce_weight, chunk):
        N = h_s.shape[0]
        loss = torch.zeros((), dtype=_acc_dtype(h_s), device=h_s.device)
        stats = torch.zeros(4, dtype=_acc_dtype(h_s), device=h_s.device)  # sum KL, sum CE, sum teacher CE, n tokens
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            valid = weight[a:b] != 0
            lp_s = _acc(h_s[a:b] @ W_s.T).log_softmax(-1)                     # (n, V)
            y = targets[a:b].clamp(min=0)
            ce = -lp_s.gather(1, y[:, None])[:, 0] * (targets[a:b] >= 0)
            kl = torch.zeros_like(ce)
            if h_t is not None:
                lp_t = _acc(h_t[a:b] @ W_t.T).log_softmax(-1)
                kl = token_kl(lp_t, lp_s)
                stats[2] += (-lp_t.gather(1, y[:, None])[:, 0] * (targets[a:b] >= 0) * valid).sum()
            loss += (weight[a:b] * (kl_weight * kl + ce_weight * ce)).sum()
            stats[0] += (kl * valid).sum()
            stats[1] += (ce * valid).sum()
            stats[3] += (valid & (targets[a:b] >= 0)).sum()
        ctx.save_for_backward(h_s, W_s, h_t if h_t is not None else torch.empty(0), W_t if W_t is not None
                              else torch.empty(0), targets, weight)
        ctx.teacher, ctx.kl_weight, ctx.ce_weight, ctx.chunk = h_t is not None, kl_weight, ce_weight, chunk
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        h_s, W_s, h_t, W_t, targets, weight = ctx.saved_tensors
        N = h_s.shape[0]
        grad_h = torch.empty_like(h_s)
        grad_W = torch.zeros(W_s.shape, dtype=_acc_dtype(W_s), device=W_s.device)
        for a in range(0, N, ctx.chunk):
            b = min(a + ctx.chunk, N)
            p_s = _acc(h_s[a:b] @ W_s.T).softmax(-1)                          # recomputed, (n, V)
            g = torch.zeros_like(p_s)
            if ctx.teacher and ctx.kl_weight:
                g += ctx.kl_weight * (p_s - _acc(h_t[a:b] @ W_t.T).softmax(-1))
            if ctx.ce_weight:
                onehot = torch.zeros_like(p_s).scatter_(1, targets[a:b].clamp(min=0)[:, None], 1.0)
                g += ctx.ce_weight * (p_s - onehot) * (targets[a:b] >= 0)[:, None]
            g *= (weight[a:b] * grad_loss)[:, None]
            grad_h[a:b] = (g.to(h_s.dtype) @ W_s).to(h_s.dtype)
            grad_W += g.T @ _acc(h_s[a:b])
        return grad_h, grad_W.to(W_s.dtype), None, None, None, None, None, None, None


def linear_kl(h_s, W_s, h_t, W_t, targets, weight, kl_weight=1.0, ce_weight=0.0, chunk=1024):
    """Chunked distillation loss from final hidden states.
    h_s (N, d) student hidden states, W_s (V, d) its output head; h_t (N, d_t), W_t (V, d_t) the teacher's (None for
    CE only); targets (N,) next-token ids (-100: no CE there); weight (N,) per-token loss weight (0 for padding; it
    also carries the normalisation, e.g. 1 / n_tokens). Returns (loss, stats): loss differentiable w.r.t. h_s, W_s;
    stats = [sum KL, sum student CE, sum teacher CE, n tokens] over tokens with weight != 0 (detached, for logging)."""
    if h_t is None and kl_weight:
        raise BadInput("kl_weight > 0 needs teacher hidden states")
    return _LinearKL.apply(h_s, W_s, h_t, W_t, targets, _acc(weight), float(kl_weight), float(ce_weight), int(chunk))


def naive_linear_kl(h_s, W_s, h_t, W_t, targets, weight, kl_weight=1.0, ce_weight=0.0):
    """The same loss the obvious way: full logits of both models in fp32 (the reference for tests and benchmarks)."""
    lp_s = _acc(h_s @ W_s.T).log_softmax(-1)
    ce = F.cross_entropy(lp_s, targets, ignore_index=-100, reduction="none")
    kl = torch.zeros_like(ce)
    if h_t is not None:
        lp_t = _acc(h_t @ W_t.T).log_softmax(-1)
        kl = F.kl_div(lp_s, lp_t, log_target=True, reduction="none").sum(-1)
    return (_acc(weight) * (kl_weight * kl + ce_weight * ce)).sum()


def token_kl(lp_ref, lp):
    """KL(p_ref || p) in nats at each position, from log-probabilities (..., V) -> (...). The one formula every KL
    of the project uses (the loss, the calibration's scores, the reports)."""
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1)


def kl_and_agreement(logits_ref, logits):
    """Two models' logits (..., V) on the same tokens -> (mean KL(p_ref || p) per token in nats, the fraction of
    tokens whose top-1 token agrees). The measure of how far one model (a student, a low-precision copy, an export)
    is from another."""
    lp_r, lp = _acc(logits_ref).log_softmax(-1), _acc(logits).log_softmax(-1)
    kl = token_kl(lp_r, lp).mean()
    return kl.item(), (logits_ref.argmax(-1) == logits.argmax(-1)).float().mean().item()


class _LinearLogprobs(torch.autograd.Function):
    """lp_i = log softmax(h_i Wᵀ)[y_i], chunk by chunk; backward recomputes the softmax:
    d lp_i / d logits_i = onehot(y_i) - softmax(logits_i)."""

    @staticmethod
    def forward(ctx, h, W, targets, chunk):
        out = torch.zeros(h.shape[0], dtype=_acc_dtype(h), device=h.device)
        for a in range(0, h.shape[0], chunk):
            b = min(a + chunk, h.shape[0])
            lp = _acc(h[a:b] @ W.T).log_softmax(-1)
            out[a:b] = lp.gather(1, targets[a:b].clamp(min=0)[:, None])[:, 0] * (targets[a:b] >= 0)
        ctx.save_for_backward(h, W, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, W, targets = ctx.saved_tensors
        grad_h = torch.empty_like(h)
        grad_W = torch.zeros(W.shape, dtype=_acc_dtype(W), device=W.device)
        for a in range(0, h.shape[0], ctx.chunk):
            b = min(a + ctx.chunk, h.shape[0])
            g = -_acc(h[a:b] @ W.T).softmax(-1)
            g.scatter_add_(1, targets[a:b].clamp(min=0)[:, None], torch.ones_like(g[:, :1]))
            g *= (grad_out[a:b] * (targets[a:b] >= 0))[:, None]
            grad_h[a:b] = (g.to(h.dtype) @ W).to(h.dtype)
            grad_W += g.T @ _acc(h[a:b])
        return grad_h, grad_W.to(W.dtype), None, None


def linear_logprobs(h, W, targets, chunk=1024):
    """h (N, d), W (V, d), targets (N,) -> (N,) fp32 log-probabilities of the targets (0 where target is -100),
    without materialising the (N, V) logits."""
    return _LinearLogprobs.apply(h, W, targets, int(chunk))


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO loss per pair, and the implicit rewards beta (log pi - log pi_ref) of both replies.
    Inputs: (B,) summed log-probabilities of each reply under the policy and the reference."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def reply_logps(token_logps, targets):
    """(N,) per-token log-probs of a (S, T) batch -> (S,) sums over the reply tokens (targets != -100)."""
    return (token_logps.view(targets.shape) * (targets != -100)).sum(-1)


def attend(q, k, v, **kw):
    """F.scaled_dot_product_attention(q, k, v, **kw) where v's head dim may be smaller than q's and k's (MLA: d_v
    against d_qk + d_r). torch's fused CPU kernel needs one head dim for all three; otherwise its math fallback runs,
    3-10x slower forward and ~2x forward + backward (docs/mla.md). So on CPU v is zero-padded to q's head dim and the
    output cut back: the same numbers (the padded output columns are zeros). On CUDA the memory-efficient kernel
    takes unequal dims as they are, so nothing is padded there."""
    d_v, d = v.shape[-1], q.shape[-1]
    if q.device.type != "cpu" or d_v == d:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, d - d_v)), **kw)[..., :d_v]


def latent_attention(q, kv, r_kv, scale, mask=None):
    """q (B, T, H, r_kv + d_r): the queries moved into latent space ([q_nope W_UK ; q_rope]); kv (B, S, r_kv + d_r):
    the latent cache; mask (T, S) bool, True = may attend (None: causal, the T queries being the last T of S).
    Returns the attention output in latent space (B, T, H, r_kv), before W_UV. The mask is explicit because
    is_causal would align it top-left, wrong for queries against a longer cache."""
    B, T, H, D = q.shape
    S = kv.shape[1]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    rows = q.reshape(B, 1, T * H, D)                                  # heads folded into the query length
    key = kv[:, None]                                                 # (B, 1, S, r_kv + d_r): one KV head
    # the value is the latent, kv[..., :r_kv]. On CPU the whole row serves as the value and the output is cut back
    # (attend's reason, without attend's copy: the extra columns need not be zeros, they are dropped)
    value = key if q.device.type == "cpu" else kv[:, None, :, :r_kv]  # a view, not a copy
    row_mask = mask.repeat_interleave(H, dim=0)                       # (T H, S): row t*H + h is token t's
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=row_mask, scale=scale)[..., :r_kv]
    return out.reshape(B, T, H, r_kv)
