"""
Performance-critical pieces, each with a plain reference it is tested against.

    python ops.py          # benchmark: peak memory and time of the chunked KL vs the naive formula (CPU/GPU)
    python ops.py decode --batches=1,4 --contexts=1024,4096        # decode step: GQA vs MLA naive vs latent
    python ops.py decode --batches=1,8,64 --contexts=1024,8192,32768 --budget_gib=60   # the full grid (GPU)
    python ops.py --help

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
import time

import torch
import torch.nn.functional as F


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
                kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
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
        raise ValueError("kl_weight > 0 needs teacher hidden states")
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
    value = kv[:, None, :, :r_kv]                                     # (B, 1, S, r_kv): a view, not a copy
    row_mask = mask.repeat_interleave(H, dim=0)                       # (T H, S): row t*H + h is token t's
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=row_mask, scale=scale)
    return out.view(B, T, H, r_kv)


def _bench():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    N, d, V = (8 * 2048, 2048, 128256) if dev == "cuda" else (512, 256, 32000)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    h_s = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
    W_s = (torch.randn(V, d, device=dev, dtype=dt) * d ** -0.5).requires_grad_()
    h_t, W_t = torch.randn(N, d, device=dev, dtype=dt), torch.randn(V, d, device=dev, dtype=dt) * d ** -0.5
    y = torch.randint(0, V, (N,), device=dev)
    w = torch.full((N,), 1.0 / N, device=dev)
    for name, fn in (("naive", lambda: naive_linear_kl(h_s, W_s, h_t, W_t, y, w)),
                     ("chunked", lambda: linear_kl(h_s, W_s, h_t, W_t, y, w, chunk=1024)[0])):
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.time()
        try:
            fn().backward()
            if dev == "cuda":
                torch.cuda.synchronize()
            mem = f", peak extra memory {(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB" if dev == "cuda" else ""
            print(f"{name:8s} N={N} d={d} V={V} on {dev}: {time.time() - t0:.3f} s forward+backward{mem}")
        except torch.OutOfMemoryError:
            print(f"{name:8s} N={N} d={d} V={V} on {dev}: out of memory")
        h_s.grad = W_s.grad = None


@torch.no_grad()
def _bench_decode(batches, contexts, ranks=(512, 128, 64), budget_gib=40.0, repeats=5):
    """One Llama-3.2-1B-shaped attention layer (d 2048, 32 heads, 8 KV heads of 64), one decode step against a
    filled cache of S tokens: GQA (SDPA over its own K/V cache), MLA naive (per-head K/V expanded into the cache,
    as the official X-EcoMLA code caches them), MLA latent (this project: r_kv + d_r per token, one SDPA call) and
    the Mamba2 layer Zebra-Llama puts in its place (a fixed state; "GB/s" there is the state read per step).
    Prints step time, tokens/s (batch / step time), cache bytes read per step / step time, and cache memory."""
    from mamba2 import Mamba2, ssd_sequential
    from model import Attention, KVCache, MLAttention, ModelConfig, rope_cos_sin, rope_inv_freq
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    esize = torch.empty((), dtype=dt).element_size()
    rq = {512: 864, 256: 1184, 128: 1344, 64: 1424, 48: 1440}
    base = dict(vocab_size=8, dim=2048, n_layers=1, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8,
                rope_theta=500000.0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    spreads = []

    def timed(fn):
        """Median of `repeats` timed calls after a warm-up; the spread (max / min) is kept: a busy machine shows
        up as a large one, and the table is then flagged instead of silently wrong."""
        fn()
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        spreads.append(ts[-1] / ts[0])
        return ts[len(ts) // 2]

    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), dtype {dt}, "
          f"{torch.get_num_threads()} threads; one attention layer, one decode step")
    print("| variant | cache numbers/token | batch | context | layer step ms | tokens/s | attention core ms | "
          "cache GB/s (core) | core vs GQA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B in batches:
        for S in contexts:
            x = torch.randn(B, 1, 2048, device=dev, dtype=dt)
            pos = torch.tensor([S - 1], device=dev)
            mask = torch.arange(S, device=dev)[None, :] <= pos[:, None]
            rope = {"gqa": rope_cos_sin(rope_inv_freq(64, 500000.0).to(dev), pos),
                    "mla": rope_cos_sin(rope_inv_freq(32, 500000.0).to(dev), pos)}
            rows = []
            gqa = Attention(ModelConfig(**base)).to(dev, dt)
            gqa.cache = KVCache(B, S, 8, 64, dt, dev)
            q = torch.randn(B, 32, 1, 64, device=dev, dtype=dt)
            rows.append(("GQA (SDPA)", 1024, timed(lambda: gqa(x, rope, pos, mask)), timed(
                lambda: F.scaled_dot_product_attention(q, gqa.cache.k, gqa.cache.v, attn_mask=mask, enable_gqa=True))))
            for r_kv in ranks:
                cfg = ModelConfig(**base, mla_layers=(0,), q_rank=(rq.get(r_kv, 1024),), kv_rank=(r_kv,),
                                  qk_nope_dim=32, qk_rope_dim=32)
                mla = MLAttention(cfg, rq.get(r_kv, 1024), r_kv).to(dev, dt)
                # naive, as the official code: per-head K (d_qk + d_r) and V (d_v) cached, attention over them
                k_exp = torch.randn(B, 32, S, 64, device=dev, dtype=dt)
                v_exp = torch.randn(B, 32, S, 64, device=dev, dtype=dt)

                def naive_step(mla=mla, k_exp=k_exp, v_exp=v_exp):
                    c_q, c_kv = mla.W_DQ(x), mla.W_DKV(x)
                    qh = torch.cat([mla.W_UQ(c_q).view(B, 1, 32, 32), mla.W_QR(c_q).view(B, 1, 32, 32)], -1)
                    k_exp[:, :, S - 1:] = torch.cat([mla.W_UK(c_kv).view(B, 1, 32, 32),
                                                     mla.W_KR(x).view(B, 1, 1, 32).expand(B, 1, 32, 32)], -1
                                                    ).transpose(1, 2)
                    v_exp[:, :, S - 1:] = mla.W_UV(c_kv).view(B, 1, 32, 64).transpose(1, 2)
                    y = F.scaled_dot_product_attention(qh.transpose(1, 2), k_exp, v_exp, attn_mask=mask,
                                                       scale=mla.scale)
                    return mla.o_proj(y.transpose(1, 2).reshape(B, 1, 2048))
                qn = torch.randn(B, 32, 1, 64, device=dev, dtype=dt)
                rows.append((f"MLA r_kv {r_kv} naive (expanded cache)", 4096, timed(naive_step), timed(
                    lambda k_exp=k_exp, v_exp=v_exp: F.scaled_dot_product_attention(qn, k_exp, v_exp, attn_mask=mask,
                                                                                    scale=0.125))))
                mla.cache = mla.make_cache(B, S, dt, dev)
                mla.path = "latent"
                ql = torch.randn(B, 1, 32, r_kv + 32, device=dev, dtype=dt)
                rows.append((f"MLA r_kv {r_kv} latent", r_kv + 32, timed(lambda mla=mla: mla(x, rope, pos, mask)),
                             timed(lambda mla=mla, ql=ql, r_kv=r_kv: latent_attention(ql, mla.cache.kv, r_kv, 0.125,
                                                                                      mask))))
            # Mamba2 (Zebra-Llama) of the same layer's shape: d_inner 2048, d_xb 512, d_state = headdim 64. Its cache
            # is a fixed state (B, 32, 64, 64) in fp32 plus a 3-token conv window, whatever the context S
            ssm = Mamba2(2048, 2048, 512, 64).to(dev, dt)
            ssm.cache = ssm.make_cache(B, S, dt, dev)
            sx, sdt = torch.randn(B, 1, 32, 64, device=dev), torch.rand(B, 1, 32, device=dev)
            sB, sC = torch.randn(B, 1, 32, 64, device=dev), torch.randn(B, 1, 32, 64, device=dev)
            A = -torch.rand(32, device=dev)
            rows.append(("Mamba2 (fixed state)", 0, timed(lambda: ssm(x, None, pos, None)),
                         timed(lambda: ssd_sequential(sx, sdt, A, sB, sC, ssm.cache.ssm))))
            state_read = ssm.state_bytes(B, dt)
            t_gqa = rows[0][3]
            spread = max(spreads)
            spreads.clear()
            for name, per_tok, t, core in rows:
                gbs = (B * S * per_tok * esize if per_tok else state_read) / core / 1e9
                print(f"| {name} | {per_tok} | {B} | {S} | {1e3 * t:.2f} | {B / t:,.0f} | {1e3 * core:.3f} | "
                      f"{gbs:.1f} | {t_gqa / core:.2f}x |", flush=True)
            print(f"|  | per-call spread (max/min of {repeats}) over this block: {spread:.2f}x"
                  + (" — WARNING: the machine is busy, these numbers are unreliable" if spread > 1.5 else "")
                  + " |||||||", flush=True)
    print("\nprefill of the whole prompt through one MLA layer (writes the latent cache): naive vs latent path")
    for S in [c for c in contexts if c <= 4096]:  # the latent path's (T H, S) scores grow too large beyond
        for r_kv in ranks:
            cfg = ModelConfig(**base, mla_layers=(0,), q_rank=(rq.get(r_kv, 1024),), kv_rank=(r_kv,), qk_nope_dim=32,
                              qk_rope_dim=32)
            mla = MLAttention(cfg, rq.get(r_kv, 1024), r_kv).to(dev, dt)
            mla.cache = mla.make_cache(1, S, dt, dev)
            pos = torch.arange(S, device=dev)
            x = torch.randn(1, S, 2048, device=dev, dtype=dt)
            rope = {"mla": rope_cos_sin(rope_inv_freq(32, 500000.0).to(dev), pos)}
            mask = pos[None, :] <= pos[:, None]
            t = {}
            for path in ("naive", "latent"):
                mla.path = path
                t[path] = timed(lambda mla=mla: mla(x, rope, pos, mask))
            print(f"  r_kv {r_kv:4d}, prompt {S:6d}: naive {1e3 * t['naive']:9.2f} ms   latent {1e3 * t['latent']:9.2f} ms")
    L = 16
    print(f"\ncache memory per sequence at 32K context, 16 layers, {dt}; largest batch in {budget_gib:.0f} GiB:")
    for name, per_tok in [("GQA", 1024), ("MLA naive (expanded)", 4096)] + [(f"MLA r_kv {r}", r + 32) for r in ranks]:
        per_seq = L * per_tok * 32768 * esize
        print(f"  {name:22s} {per_seq / 2**30:6.2f} GiB/seq   max batch {int(budget_gib * 2**30 // per_seq)}")


if __name__ == "__main__":
    import sys

    from configurator import configure
    batches = "1,4"            # decode: batch sizes, comma-separated
    contexts = "1024,4096"     # decode: filled cache lengths, comma-separated
    budget_gib = 40.0          # decode: memory for the largest-batch table
    repeats = 5                # decode: timed calls per measurement (the median is reported, the spread checked)
    _decode = sys.argv[1:2] == ["decode"]
    if _decode:
        sys.argv = sys.argv[:1] + sys.argv[2:]
    configure(globals())
    if _decode:
        _bench_decode([int(v) for v in str(batches).split(",")], [int(v) for v in str(contexts).split(",")],
                      budget_gib=budget_gib, repeats=repeats)
    else:
        _bench()
