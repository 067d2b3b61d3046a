"""
Mamba2 (Dao & Gu, "Transformers are SSMs", arXiv 2405.21060) as a drop-in for attention: the state space layer
Zebra-Llama (arXiv 2505.17272) puts in most layers of an upcycled Llama. Its cache is a fixed-size state per
sequence, not a per-token one. Its own file because it is its own concept: a recurrence and the chunked scan that
computes it, neither of which the rest of model.py needs to know about.

    python -m pytest tests/test_mamba2.py         # chunked == sequential, prefill + decode == full, init mapping

The recurrence, per head h (headdim P = d_h channels, state N = d_state dims), for each token t:
    a_t = exp(dt_t A)                         A = -exp(A_log) < 0, dt_t = softplus(dt_raw_t + dt_bias) > 0
    S_t = a_t S_{t-1} + dt_t x_t B_t^T        S (P, N): the state; x_t (P) "value", B_t (N) "key"
    y_t = S_t C_t + D x_t                     C_t (N) "query"
Unrolled, y_t = sum_{s<=t} (C_t . B_s) (a_{s+1} ... a_t) dt_s x_s + D x_t: causal linear attention with a
data-dependent decay. That is what makes the init from attention work (zebra.py): C <- W_Q, B <- W_K, x <- W_V.

Two ways to compute it (the same numbers; tests/test_mamba2.py checks values and gradients):
    ssd_sequential   the recurrence itself, one token at a time: the reference, and the one-token decode step
    ssd_chunked      the SSD algorithm: within chunks of Q tokens the quadratic (attention-like) form, between
                     chunks the recurrence over chunk states. Training and prefill (matmuls instead of a T-step loop)
Everything inside the scan runs in fp32 (exp of cumulative sums loses precision fast in bf16).
Shapes: b batch, T length, H heads, P headdim, N d_state, c chunks, Q chunk length.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import BadInput


def ssd_sequential(x, dt, A, B, C, state=None):
    """x (b, T, H, P), dt (b, T, H), A (H,), B and C (b, T, H, N), state (b, H, P, N) or None (zeros).
    Returns y (b, T, H, P) without the D skip, and the final state (b, H, P, N)."""
    b, T, H, P = x.shape
    S = x.new_zeros(b, H, P, B.shape[-1]) if state is None else state
    ys = []
    for t in range(T):
        a = torch.exp(dt[:, t] * A)                                            # (b, H)
        S = a[..., None, None] * S + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
    return torch.stack(ys, dim=1), S


def segsum(a):
    """a (..., Q) -> (..., Q, Q): out[i, j] = a[j+1] + ... + a[i] for j <= i (0 on the diagonal), -inf above it.
    exp(out) is the decay from token j to token i. Summed from masked entries, not as a difference of cumulative
    sums, which would cancel catastrophically once the sums are large."""
    Q = a.shape[-1]
    e = a[..., :, None].expand(*a.shape, Q)                                    # e[..., k, j] = a[k]
    after = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)       # k > j
    out = e.masked_fill(~after, 0.0).cumsum(dim=-2)                            # sum over j < k <= i
    return out.masked_fill(~torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(0), float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk=64, state=None):
    """The SSD scan: same arguments and results as ssd_sequential, any length T (the tail chunk is padded with
    dt = 0, i.e. a = 1 and no input: the state passes through it unchanged)."""
    b, T, H, P = x.shape
    pad = -T % chunk
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = x.shape[1] // chunk
    x, B, C = (t.reshape(b, c, chunk, H, t.shape[-1]) for t in (x, B, C))    # (b, c, Q, H, *)
    dt = dt.reshape(b, c, chunk, H)
    a = (dt * A).permute(0, 3, 1, 2)                                           # (b, H, c, Q): log-decay per token
    xdt = x * dt[..., None]                                                    # dt_s x_s, (b, c, Q, H, P)
    a_cum = a.cumsum(dim=-1)                                                   # (b, H, c, Q)
    # 1. within each chunk: the quadratic form, y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + .. + a_i) dt_j x_j
    L = torch.exp(segsum(a))                                                   # (b, H, c, Q, Q)
    y = torch.einsum("bcihn,bcjhn,bhcij,bcjhp->bcihp", C, B, L, xdt)
    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum)                                # (b, H, c, Q)
    chunk_states = torch.einsum("bcjhn,bhcj,bcjhp->bchpn", B, to_end, xdt)    # (b, c, H, P, N)
    # 3. the recurrence over chunks: the state entering each chunk (and the final one)
    S0 = x.new_zeros(b, H, P, B.shape[-1]) if state is None else state
    chunk_states = torch.cat([S0[:, None], chunk_states], dim=1)              # (b, c + 1, H, P, N)
    between = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))                # (b, H, c + 1, c + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", between, chunk_states)        # (b, c + 1, H, P, N)
    # 4. what each token reads from the state that entered its chunk
    from_start = torch.exp(a_cum)                                              # (b, H, c, Q)
    y = y + torch.einsum("bcihn,bchpn,bhci->bcihp", C, states[:, :-1], from_start)
    return y.reshape(b, c * chunk, H, P)[:, :T], states[:, -1]


def ssm_init(H, generator=None, dt_range=(1e-3, 0.1), A_range=(1.0, 16.0)):
    """Mamba2's own init of a layer's SSM parameters, (dt_bias, A_log, D) of H each: dt log-uniform in dt_range
    (dt_bias = softplus^-1(dt)), A uniform in A_range (A_log = log A), D = 1."""
    u = torch.rand(H, generator=generator)
    dt = torch.exp(u * (math.log(dt_range[1]) - math.log(dt_range[0])) + math.log(dt_range[0])).clamp(min=1e-4)
    dt_bias = dt + torch.log(-torch.expm1(-dt))                                # softplus^-1(dt)
    return dt_bias, torch.empty(H).uniform_(*A_range, generator=generator).log(), torch.ones(H)


class SSMCache(nn.Module):
    """A Mamba2 layer's whole cache for a batch: the last d_conv - 1 inputs of the causal conv, (B, conv_dim,
    d_conv - 1), and the state S, (B, H, P, N) in fp32. Its size does not grow with the context."""

    def __init__(self, B, conv_dim, d_conv, H, P, N, dtype, device):
        super().__init__()
        self.register_buffer("conv", torch.zeros(B, conv_dim, d_conv - 1, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("ssm", torch.zeros(B, H, P, N, dtype=torch.promote_types(dtype, torch.float32),
                                                device=device), persistent=False)


class Mamba2(nn.Module):
    """The Mamba2 mixer in Zebra-Llama's / MambaInLlama's shape, so that attention weights map onto it:
    in_proj rows [z, x, B, C, dt] of widths [d_inner, d_xb, d_xb, d_inner, H]: x and B have d_xb = n_kv d_h channels
    (like GQA's V and K) and are repeated to the H heads as GQA repeats K and V; C has d_inner = H d_h (like Q).
    headdim = d_state = d_h, nheads = d_inner / d_state. The causal depthwise conv runs over [x, B, C]; then SiLU,
    the scan, the skip D x, a gate SiLU(z) and an RMSNorm per head (norm_before_gate=False), and out_proj."""

    def __init__(self, d_model, d_inner, d_xb, d_state, d_conv=4, chunk=64, norm_eps=1e-5):
        super().__init__()
        self.check_shape(d_inner, d_xb, d_state, d_conv, chunk)
        self.d_inner, self.d_xb, self.N, self.d_conv, self.chunk = d_inner, d_xb, d_state, d_conv, chunk
        self.H, self.P = d_inner // d_state, d_state
        self.conv_dim = d_inner + 2 * d_xb
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_xb + self.H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(self.H))
        self.A_log = nn.Parameter(torch.zeros(self.H))
        self.D = nn.Parameter(torch.ones(self.H))
        self.norm_weight = nn.Parameter(torch.ones(d_inner))
        self.norm_eps = norm_eps
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.cache = None
        self.reset_ssm_parameters()

    @staticmethod
    def check_shape(d_inner, d_xb, d_state, d_conv, chunk):
        if min(d_inner, d_xb, d_state) < 1 or d_inner % d_state or d_xb % d_state or d_inner % d_xb:
            raise BadInput(f"Mamba2 shape does not divide: d_inner {d_inner} and d_xb {d_xb} must be multiples of "
                           f"d_state {d_state}, and d_inner of d_xb (heads repeat x and B as GQA repeats K/V). "
                           "Fix: the config's ssm_d_inner / ssm_d_xb / ssm_d_state (0 follows the source's heads)")
        if d_conv < 1 or chunk < 1:
            raise BadInput(f"Mamba2 needs ssm_d_conv >= 1 and ssm_chunk >= 1, got {d_conv} and {chunk}")

    @torch.no_grad()
    def reset_ssm_parameters(self, generator=None):
        for p, v in zip((self.dt_bias, self.A_log, self.D), ssm_init(self.H, generator)):
            p.copy_(v)

    def make_cache(self, B, S, dtype, device):  # S (the context) is not needed: the state has a fixed size
        return SSMCache(B, self.conv_dim, self.d_conv, self.H, self.P, self.N, dtype, device)

    def cache_elements_per_token(self):
        return 0

    def state_bytes(self, batch, dtype=torch.bfloat16):
        """Bytes of the fixed-size cache per batch: the conv window in `dtype`, the state in fp32 (at least)."""
        conv = self.conv_dim * (self.d_conv - 1) * torch.empty((), dtype=dtype).element_size()
        ssm = self.H * self.P * self.N * torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
        return batch * (conv + ssm)

    def split(self, zxbcdt):
        """in_proj's output (b, T, *) -> z (b, T, d_inner), xBC (b, T, conv_dim), dt_raw (b, T, H)."""
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.H], dim=-1)

    def heads(self, xBC):
        """The conv's output -> x (b, T, H, P), B (b, T, H, N), C (b, T, H, N), x and B repeated over each group
        of H / n_kv heads (head h reads KV group h // (H / n_kv), exactly as GQA's repeat_kv)."""
        b, T, _ = xBC.shape
        x, B, C = torch.split(xBC, [self.d_xb, self.d_xb, self.d_inner], dim=-1)
        rep = self.d_inner // self.d_xb
        x = x.view(b, T, self.d_xb // self.P, 1, self.P).expand(-1, -1, -1, rep, -1).reshape(b, T, self.H, self.P)
        B = B.view(b, T, self.d_xb // self.N, 1, self.N).expand(-1, -1, -1, rep, -1).reshape(b, T, self.H, self.N)
        return x, B, C.view(b, T, self.H, self.N)

    def forward(self, u, rope=None, input_pos=None, mask=None):
        """u (b, T, d) -> (b, T, d). rope and mask are the attention layers' and unused: Mamba2 has no positions.
        With input_pos (the model's cache mode) the layer continues from its cache and leaves its state there;
        a sequence that starts at position 0 starts from a zero state (no host sync: a select, not a multiply by 0,
        which would keep a NaN or Inf an earlier sequence left), so the caches need no reset between sequences. A
        state cannot be rewound: positions must follow on."""
        b, T, _ = u.shape
        z, xBC, dt_raw = self.split(self.in_proj(u))
        cache = self.cache if input_pos is not None else None
        if cache is not None:
            carry = input_pos[0] > 0                                           # False at the start of a sequence
            window = torch.where(carry, cache.conv, 0.0)                       # (b, conv_dim, d_conv - 1)
        else:
            window = xBC.new_zeros(b, self.conv_dim, self.d_conv - 1)
        seq = torch.cat([window, xBC.transpose(1, 2)], dim=-1)                 # (b, conv_dim, d_conv - 1 + T)
        xBC = F.silu(F.conv1d(seq, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim).transpose(1, 2))
        x, B, C = self.heads(xBC)
        f32 = torch.promote_types(u.dtype, torch.float32)
        dt = F.softplus(dt_raw.to(f32) + self.dt_bias.to(f32))                 # (b, T, H)
        A = -torch.exp(self.A_log.to(f32))                                     # (H,)
        S0 = torch.where(carry, cache.ssm, 0.0) if cache is not None else None
        args = (x.to(f32), dt, A, B.to(f32), C.to(f32))
        y, S = ssd_sequential(*args, S0) if T == 1 else ssd_chunked(*args, self.chunk, S0)
        if cache is not None:
            cache.conv.copy_(seq[..., seq.shape[-1] - (self.d_conv - 1):])
            cache.ssm.copy_(S)
        y = y + self.D.to(f32)[:, None] * x.to(f32)                            # the skip D x, (b, T, H, P)
        return self.out_proj(self.gated_norm(y, z).to(u.dtype))

    def gated_norm(self, y, z):
        """y * SiLU(z), then an RMSNorm over each head's P channels (Mamba2's norm_before_gate=False), in fp32."""
        g = y * F.silu(z.to(y.dtype)).view(y.shape)                            # (b, T, H, P)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return self.norm_weight.to(y.dtype) * g.flatten(2)
