"""
The model: a Llama 3 family decoder (as Hugging Face's LlamaForCausalLM computes it) in which any subset of
layers may use Multi-head Latent Attention (MLA) instead of grouped-query attention (GQA), or a Mamba2 state space
layer (mamba2.py; Zebra-Llama's hybrids, zebra.py).

Run it (text from BOS with a Hugging Face Llama folder or hub id; CPU, or one GPU):
    python model.py                                     # the bundled stories260K, CPU
    python model.py meta-llama/Llama-3.2-1B-Instruct --device=cuda --dtype=bfloat16   # needs the hub

Notation (paper X-EcoMLA, arXiv 2503.11132, §3.2; the names below are used throughout the project):
    d      model width                       H      query heads        n_kv   key/value heads (GQA)
    d_h    head dim of the source Llama      r_q    query latent rank  r_kv   key-value latent rank
    d_qk   per-head "no-RoPE" q/k dims       d_r    RoPE dims (queries per head; ONE key shared by all heads)
    d_v    value head dim (= d_h)
    W_DQ  (d -> r_q)         c_q   = x W_DQ                 query latent
    W_UQ  (r_q -> H d_qk)    q_nope = c_q W_UQ
    W_QR  (r_q -> H d_r)     q_rope = RoPE(c_q W_QR)
    W_DKV (d -> r_kv)        c_kv  = x W_DKV                key-value latent: THIS is what is cached
    W_KR  (d -> d_r)         k_rope = RoPE(x W_KR)          shared RoPE key: cached too
    W_UK  (r_kv -> H d_qk)   k_nope = c_kv W_UK
    W_UV  (r_kv -> H d_v)    v     = c_kv W_UV
    W_O   (H d_v -> d)       out   = attn(q, k, v) W_O      (named o_proj, as in the source Llama)
nn.Linear stores its weight as (out, in), i.e. the transpose of the paper's W (in x out).
Cache per token and layer: GQA 2 n_kv d_h numbers, MLA r_kv + d_r.

Shapes are commented with short letters: B batch, T query length, S key length (the cache), V vocab.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from errors import BadInput
from folders import read_config_json, resolve_checkpoint
from ops import attend, latent_attention
from mamba2 import Mamba2
from tokenizer import Tokenizer, load_vocab_decoder

# -----------------------------------------------------------------------------
# Config

LATENT_NORMS = ("none", "kv", "both")


def latent_norm_kind(value) -> str:
    """A latent_norm setting as one of LATENT_NORMS; True / False (the older on/off switch) mean "both" / "none"."""
    if isinstance(value, bool):
        value = "both" if value else "none"
    if value not in LATENT_NORMS:
        raise BadInput(f"latent_norm={value!r}: use one of {LATENT_NORMS}")
    return value


@dataclass
class ModelConfig:
    vocab_size: int = 512
    dim: int = 64                      # d (HF: hidden_size)
    n_layers: int = 5
    n_heads: int = 8                   # H
    n_kv_heads: int = 4                # n_kv; == n_heads is plain multi-head attention
    head_dim: int = 8                  # d_h
    intermediate_size: int = 172       # SwiGLU hidden width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # HF "rope_scaling" dict; only rope_type "llama3" (or none) is supported
    max_seq_len: int = 512             # HF: max_position_embeddings
    tie_embeddings: bool = True
    bos_id: int | None = 1
    eos_id: tuple = (2,)               # Llama 3 Instruct configs list several ids
    # --- MLA: which layers are MLA, and their per-layer ranks (aligned with mla_layers) ---
    mla_layers: tuple = ()             # indices of MLA layers; the others stay GQA (a hybrid model)
    q_rank: tuple = ()                 # r_q per MLA layer
    kv_rank: tuple = ()                # r_kv per MLA layer
    qk_nope_dim: int = 0               # d_qk
    qk_rope_dim: int = 0               # d_r
    qk_rope_theta: float = 0.0         # theta of MLA's d_r-dim rotary ladder (0: rope_theta). svd_init's "rorope"
                                       # keeps a subset of the source's frequencies that such a ladder computes
    rope_fold: int = 1                 # how svd_init's "rorope" built the shared key: f adjacent source frequencies
                                       # folded per group (1: none). A record only: the forward does not read it
    v_head_dim: int = 0                # d_v (0: = head_dim)
    latent_norm: str = "none"          # RMSNorm on the latents: "none", "kv" (on c_kv) or "both" (c_q and c_kv).
                                       # DeepSeek has both; serving engines need "kv" at least (deepseek.py)
    latent_norm_eps: float = 1e-6      # DeepSeek's (HF DeepseekV3 computes its latent norms with 1e-6)
    conversion: dict | None = field(default=None, compare=False)  # the svd_init.Conversion the MLA layers were
                                       # built by (config.json: "mla_conversion"). A record only: the forward does not
                                       # read it, and two configs that differ only here are the same model
    # --- Mamba2 (Zebra-Llama): which layers are state space layers instead of attention (mamba2.py) ---
    mamba_layers: tuple = ()           # indices; disjoint from mla_layers. Every other layer is GQA or MLA
    ssm_d_inner: int = 0               # 0: n_heads d_h (C and z; as Q)
    ssm_d_xb: int = 0                  # 0: n_kv_heads d_h (x and B; as V and K)
    ssm_d_state: int = 0               # 0: d_h (= headdim; nheads = d_inner / d_state)
    ssm_d_conv: int = 4                # causal conv width
    ssm_chunk: int = 64                # SSD chunk length (compute only: any value gives the same numbers)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
                     "max_seq_len"):  # a config.json of the wrong types fails here, named, not deep inside torch
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                hf = dict(dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                          n_kv_heads="num_key_value_heads", max_seq_len="max_position_embeddings").get(name, name)
                raise BadInput(f"{name}={v!r} (config.json: {hf}): must be a whole number >= 1")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise BadInput(f"{name}={v!r}: must be a number > 0")
        for name in ("mla_layers", "q_rank", "kv_rank", "eos_id", "mamba_layers"):
            v = getattr(self, name)
            setattr(self, name, tuple(v) if isinstance(v, (list, tuple)) else ((v,) if v is not None else ()))
        if self.v_head_dim == 0:
            self.v_head_dim = self.head_dim
        self.latent_norm = latent_norm_kind(self.latent_norm)
        if self.n_heads % self.n_kv_heads:
            raise BadInput(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        self.ssm_d_inner = self.ssm_d_inner or self.n_heads * self.head_dim
        self.ssm_d_xb = self.ssm_d_xb or self.n_kv_heads * self.head_dim
        self.ssm_d_state = self.ssm_d_state or self.head_dim
        if self.mamba_layers:
            m = list(self.mamba_layers)
            if len(set(m)) != len(m) or not all(0 <= i < self.n_layers for i in m):
                raise BadInput(f"mamba_layers={m} must be distinct indices in [0, {self.n_layers})")
            if set(m) & set(self.mla_layers):
                raise BadInput(f"layers {sorted(set(m) & set(self.mla_layers))} are in both mla_layers and "
                               "mamba_layers: a layer is GQA, MLA or Mamba2")
            Mamba2.check_shape(self.ssm_d_inner, self.ssm_d_xb, self.ssm_d_state, self.ssm_d_conv, self.ssm_chunk)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise BadInput(f"rope_scaling type {kind!r} is not supported (only 'llama3' or none)")
        if not self.mla_layers:
            return
        n = len(self.mla_layers)
        if len(self.q_rank) != n or len(self.kv_rank) != n:
            raise BadInput(f"q_rank and kv_rank need one entry per MLA layer ({n} layers {list(self.mla_layers)}), "
                           f"got {len(self.q_rank)} and {len(self.kv_rank)}")
        if len(set(self.mla_layers)) != n or not all(0 <= i < self.n_layers for i in self.mla_layers):
            raise BadInput(f"mla_layers={list(self.mla_layers)} must be distinct indices in [0, {self.n_layers})")
        if min(self.q_rank) < 1 or min(self.kv_rank) < 1:
            raise BadInput(f"ranks must be >= 1, got q_rank={list(self.q_rank)} kv_rank={list(self.kv_rank)}")
        if self.qk_nope_dim < 1 or self.qk_rope_dim < 2 or self.qk_rope_dim % 2:
            raise BadInput(f"MLA needs qk_nope_dim >= 1 and an even qk_rope_dim >= 2, "
                           f"got {self.qk_nope_dim} and {self.qk_rope_dim}")

    def layer_type(self, layer: int) -> str:
        return "mamba2" if layer in self.mamba_layers else "mla" if layer in self.mla_layers else "gqa"

    def mla_ranks(self, layer: int):
        """(r_q, r_kv) if `layer` is an MLA layer, else None."""
        if layer not in self.mla_layers:
            return None
        j = self.mla_layers.index(layer)
        return self.q_rank[j], self.kv_rank[j]

    # --- Hugging Face config.json <-> ModelConfig ---
    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        return cls(**checkpoint.config_fields(hf))  # a Llama, ours or a DeepSeek-format config.json

    def to_hf(self) -> dict:
        return checkpoint.config_json(self)


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 inside, cast back before the weight: exactly HF's LlamaRMSNorm
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 at least (fp64 stays, for exactness tests)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(rot_dim, theta, scaling=None):
    """Inverse frequencies of a rotary embedding over `rot_dim` dims, with Llama 3's frequency-dependent scaling
    (factor, low/high_freq_factor, original_max_position_embeddings) when `scaling` says "llama3"."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq, pos):
    """cos, sin of shape (T, rot_dim) in fp32 for positions `pos` (T,); rotate-half layout: dim i pairs with
    i + rot_dim/2, both with frequency inv_freq[i] (the layout of HF checkpoints)."""
    freqs = pos.float()[:, None] * inv_freq[None, :]   # (T, rot_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)            # (T, rot_dim)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x (B, T, h, D) rotated by cos/sin (T, D); computed in x's dtype, like HF."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -----------------------------------------------------------------------------
# Static KV caches (gpt-fast style: preallocated once, written in place at `input_pos`)


class KVCache(nn.Module):
    """GQA layer: K and V of every head, (B, n_kv, S, d_h) each: 2 n_kv d_h numbers per token."""

    def __init__(self, B, S, n_kv, d_h, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(B, n_kv, S, d_h, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(B, n_kv, S, d_h, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):  # k, v (B, n_kv, T, d_h)
        if k.shape[2] > 1:  # a prefill: what an earlier sequence left beyond it is cleared (see clear_beyond)
            clear_beyond(self.k, 2, input_pos)
            clear_beyond(self.v, 2, input_pos)
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


def clear_beyond(buf, dim, input_pos):
    """Zero the cache positions after input_pos[-1] along `dim`, in place and without a host sync. The mask hides
    them from the softmax, but a hidden value still enters P @ V as 0 x value: a NaN or Inf left there by an
    earlier sequence would survive (0 x NaN = NaN). Run at each prefill (and generate() zeroes the caches when a
    sequence starts), so a reused cache gives what a fresh one does, whatever it held."""
    S = buf.shape[dim]
    stale = (torch.arange(S, device=buf.device) > input_pos[-1]).view([S if i == dim else 1 for i in range(buf.dim())])
    buf.masked_fill_(stale, 0)


class LatentCache(nn.Module):
    """MLA layer: only the latent c_kv and the shared RoPE key, side by side in one (B, S, r_kv + d_r) buffer:
    r_kv + d_r numbers per token. One buffer because the fast decode (ops.latent_attention) reads a token's row
    whole as its key ([c_kv ; k_rope]) and its first r_kv numbers as its value."""

    def __init__(self, B, S, r_kv, d_r, dtype, device):
        super().__init__()
        self.r_kv = r_kv
        self.register_buffer("kv", torch.zeros(B, S, r_kv + d_r, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, c_kv, k_rope):  # c_kv (B, T, r_kv), k_rope (B, T, d_r)
        if c_kv.shape[1] > 1:  # a prefill: see clear_beyond
            clear_beyond(self.kv, 1, input_pos)
        self.kv.index_copy_(1, input_pos, torch.cat([c_kv, k_rope], dim=-1).to(self.kv.dtype))
        return self.kv[..., :self.r_kv], self.kv[..., self.r_kv:]


# -----------------------------------------------------------------------------
# Attention: GQA (the source Llama's) and MLA (what it is upcycled into)


class Attention(nn.Module):
    """Grouped-query attention, HF Llama names and layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, n_kv, d_h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.H, self.n_kv, self.d_h = H, n_kv, d_h
        self.q_proj = nn.Linear(cfg.dim, H * d_h, bias=False)
        self.k_proj = nn.Linear(cfg.dim, n_kv * d_h, bias=False)
        self.v_proj = nn.Linear(cfg.dim, n_kv * d_h, bias=False)
        self.o_proj = nn.Linear(H * d_h, cfg.dim, bias=False)
        self.cache = None

    def make_cache(self, B, S, dtype, device):
        return KVCache(B, S, self.n_kv, self.d_h, dtype, device)

    def cache_elements_per_token(self):
        return 2 * self.n_kv * self.d_h

    def forward(self, x, rope, input_pos=None, mask=None):
        B, T, _ = x.shape
        return self.o_proj(self.heads(x, rope, input_pos, mask).reshape(B, T, self.H * self.d_h))

    def heads(self, x, rope, input_pos=None, mask=None):
        """Each head's output before o_proj, (B, T, H, d_h)."""
        B, T, _ = x.shape
        cos, sin = rope["gqa"]
        q = apply_rope(self.q_proj(x).view(B, T, self.H, self.d_h), cos, sin)     # (B, T, H, d_h)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.d_h), cos, sin)  # (B, T, n_kv, d_h)
        v = self.v_proj(x).view(B, T, self.n_kv, self.d_h)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)         # (B, h, T, d_h)
        if input_pos is None:   # training / full forward: no cache, square causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:                   # with a cache: an explicit mask (is_causal would align it top-left: wrong here)
            k, v = self.cache.update(input_pos, k, v)                              # (B, n_kv, S, d_h)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2)


class MLAttention(nn.Module):
    """Multi-head Latent Attention (paper eqs. 3-7) with per-layer ranks r_q, r_kv.

    Mathematically equal paths:
      naive    up-project the latent into per-head K (d_qk + shared d_r) and V (d_v), then SDPA. Training, prefill.
      absorbed never materialise per-head K/V: fold W_UK into the query, attend over the latent itself, apply W_UV
               after the attention; written as plain einsums (the reference). Per token it reads only r_kv + d_r
               numbers of cache.
      latent   the absorbed math as one multi-query SDPA call with the heads folded into the query rows
               (ops.latent_attention): the fast decode path.
    `path` = "auto" picks naive for a full forward and multi-token prefill, latent for one-token decode steps.
    """

    def __init__(self, cfg: ModelConfig, r_q, r_kv):
        super().__init__()
        H, d_qk, d_r, d_v = cfg.n_heads, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim
        self.H, self.d_qk, self.d_r, self.d_v, self.r_q, self.r_kv = H, d_qk, d_r, d_v, r_q, r_kv
        self.scale = 1.0 / math.sqrt(d_qk + d_r)
        self.W_DQ = nn.Linear(cfg.dim, r_q, bias=False)
        self.W_UQ = nn.Linear(r_q, H * d_qk, bias=False)
        self.W_QR = nn.Linear(r_q, H * d_r, bias=False)
        self.W_DKV = nn.Linear(cfg.dim, r_kv, bias=False)
        self.W_KR = nn.Linear(cfg.dim, d_r, bias=False)
        self.W_UK = nn.Linear(r_kv, H * d_qk, bias=False)
        self.W_UV = nn.Linear(r_kv, H * d_v, bias=False)
        self.o_proj = nn.Linear(H * d_v, cfg.dim, bias=False)
        self.q_norm = RMSNorm(r_q, cfg.latent_norm_eps) if cfg.latent_norm == "both" else nn.Identity()
        self.kv_norm = RMSNorm(r_kv, cfg.latent_norm_eps) if cfg.latent_norm != "none" else nn.Identity()
        self.cache = None
        self.path = "auto"

    def make_cache(self, B, S, dtype, device):
        return LatentCache(B, S, self.r_kv, self.d_r, dtype, device)

    def cache_elements_per_token(self):
        return self.r_kv + self.d_r

    def forward(self, x, rope, input_pos=None, mask=None):
        B, T, _ = x.shape
        return self.o_proj(self.heads(x, rope, input_pos, mask).reshape(B, T, self.H * self.d_v))

    def project(self, x, rope):
        """The queries and what the cache holds: q_nope (B, T, H, d_qk), q_rope (B, T, H, d_r), c_kv (B, T, r_kv),
        k_rope (B, T, d_r)."""
        B, T, _ = x.shape
        cos, sin = rope["mla"]
        c_q = self.q_norm(self.W_DQ(x))                                            # (B, T, r_q)
        q_nope = self.W_UQ(c_q).view(B, T, self.H, self.d_qk)                      # (B, T, H, d_qk)
        q_rope = apply_rope(self.W_QR(c_q).view(B, T, self.H, self.d_r), cos, sin)  # (B, T, H, d_r)
        c_kv = self.kv_norm(self.W_DKV(x))                                         # (B, T, r_kv)
        k_rope = apply_rope(self.W_KR(x).view(B, T, 1, self.d_r), cos, sin)[:, :, 0]  # (B, T, d_r), one per token
        return q_nope, q_rope, c_kv, k_rope

    def heads(self, x, rope, input_pos=None, mask=None):
        """Each head's output before o_proj, (B, T, H, d_v)."""
        T = x.shape[1]
        q_nope, q_rope, c_kv, k_rope = self.project(x, rope)
        if input_pos is not None:
            c_kv, k_rope = self.cache.update(input_pos, c_kv, k_rope)              # (B, S, r_kv), (B, S, d_r)
        path = self.path if self.path != "auto" else ("latent" if T == 1 and input_pos is not None else "naive")
        if path == "latent":
            kv = self.cache.kv if input_pos is not None else torch.cat([c_kv, k_rope], dim=-1)  # (B, S, r_kv + d_r)
            y = self._latent(q_nope, q_rope, kv, mask)
        else:
            y = (self._absorbed if path == "absorbed" else self._naive)(q_nope, q_rope, c_kv, k_rope, mask)
        return y                                                                   # (B, T, H, d_v)

    def _latent(self, q_nope, q_rope, kv, mask):
        """The absorbed path as one multi-query SDPA call over the latent cache kv (B, S, r_kv + d_r): decode."""
        W_UK = self.W_UK.weight.view(self.H, self.d_qk, self.r_kv)
        W_UV = self.W_UV.weight.view(self.H, self.d_v, self.r_kv)
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, W_UK)                       # (B, T, H, r_kv)
        o_lat = latent_attention(torch.cat([q_lat, q_rope], dim=-1), kv, self.r_kv, self.scale, mask)
        return torch.einsum("bthr,hdr->bthd", o_lat, W_UV)                         # (B, T, H, d_v)

    def _naive(self, q_nope, q_rope, c_kv, k_rope, mask):
        B, S, H = c_kv.shape[0], c_kv.shape[1], self.H
        k_nope = self.W_UK(c_kv).view(B, S, H, self.d_qk)                          # (B, S, H, d_qk)
        v = self.W_UV(c_kv).view(B, S, H, self.d_v)                                # (B, S, H, d_v)
        q = torch.cat([q_nope, q_rope], dim=-1)                                    # (B, T, H, d_qk + d_r)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, S, H, self.d_r)], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)          # (B, H, *, *)
        if mask is None:
            y = attend(q, k, v, is_causal=True, scale=self.scale)
        else:
            y = attend(q, k, v, attn_mask=mask, scale=self.scale)
        return y.transpose(1, 2)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        W_UV = self.W_UV.weight.view(self.H, self.d_v, self.r_kv)
        o_lat = self.mixed_latent(q_nope, q_rope, c_kv, k_rope, mask)              # (B, H, T, r_kv)
        return torch.einsum("bhtr,hdr->bthd", o_lat, W_UV)                         # (B, T, H, d_v)

    def mixed_latent(self, q_nope, q_rope, c_kv, k_rope, mask=None):
        """Each head's attention-weighted latent (B, H, T, r_kv): what W_UV turns into the head's output."""
        # q_nope . k_nope = q_nope . (c_kv W_UK) = (q_nope W_UK^T) . c_kv: the query moves into latent space
        W_UK = self.W_UK.weight.view(self.H, self.d_qk, self.r_kv)
        q_lat = torch.einsum("bthd,hdr->bhtr", q_nope, W_UK)                       # (B, H, T, r_kv)
        scores = (torch.einsum("bhtr,bsr->bhts", q_lat, c_kv)
                  + torch.einsum("bthd,bsd->bhts", q_rope, k_rope))  # (B, H, T, S)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.scale
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(c_kv.dtype)
        return torch.einsum("bhts,bsr->bhtr", p, c_kv)                             # (B, H, T, r_kv)


class Block(nn.Module):
    """One decoder layer; its mixer is GQA or MLA (`self_attn`) or Mamba2 (`mamba`, as Zebra-Llama names it)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        ranks = cfg.mla_ranks(layer)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if layer in cfg.mamba_layers:
            self.mamba = Mamba2(cfg.dim, cfg.ssm_d_inner, cfg.ssm_d_xb, cfg.ssm_d_state, cfg.ssm_d_conv,
                                cfg.ssm_chunk, cfg.norm_eps)
        else:
            self.self_attn = MLAttention(cfg, *ranks) if ranks else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    @property
    def mixer(self):
        return self.mamba if "mamba" in self._modules else self.self_attn

    def forward(self, x, rope, input_pos=None, mask=None):
        return self.finish(x, self.mixer(self.input_layernorm(x), rope, input_pos, mask))

    def finish(self, x, y):
        """The rest of the layer, given its mixer's output y on x: the residual add, then the MLP's."""
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    """State-dict keys are exactly Hugging Face Llama's (model.layers.N.self_attn.q_proj.weight, ...);
    MLA layers hold model.layers.N.self_attn.W_DQ.weight etc. instead of q/k/v_proj, Mamba2 layers
    model.layers.N.mamba.in_proj.weight etc. (mamba2.py)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.dim),
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layers)),
            norm=RMSNorm(config.dim, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._init_rope()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)  # HF initializer_range

    def _init_rope(self, device=None):
        c = self.config
        self.register_buffer("inv_freq_gqa", rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).to(device),
                             persistent=False)
        # MLA's d_r RoPE dims: a standard d_r-dim rotary with the source's llama3 scaling (as DeepSeek does), at
        # theta qk_rope_theta (recorded by svd_init: a ladder of the source's own frequencies) or the source's theta
        d_r = c.qk_rope_dim or 2
        self.register_buffer("inv_freq_mla", rope_inv_freq(d_r, c.qk_rope_theta or c.rope_theta, c.rope_scaling
                                                           ).to(device), persistent=False)

    # --- forward ---
    def _rope(self, pos):
        return {"gqa": rope_cos_sin(self.inv_freq_gqa, pos), "mla": rope_cos_sin(self.inv_freq_mla, pos)}

    def forward_hidden(self, idx, input_pos=None, layer_states=False):
        """Final normed hidden states (B, T, d). `input_pos` (T,) positions: given, the layers read and write their
        caches (set up by setup_caches) and attend to all cached positions <= their own; None: a plain causal forward
        over positions 0..T-1 with no cache. layer_states=True returns the residual stream instead: the list
        [h_0, ..., h_L] of each block's input and the last block's output (before the final norm), for ILD."""
        B, T = idx.shape
        pos = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        rope = self._rope(pos)
        mask = None
        if input_pos is not None:
            if self.cache_len is None:
                raise RuntimeError("input_pos given but no cache: call model.setup_caches(batch, max_seq_len) first")
            mask = torch.arange(self.cache_len, device=idx.device)[None, :] <= input_pos[:, None]  # (T, S)
        x = self.model.embed_tokens(idx)                                           # (B, T, d)
        states = [x]
        for block in self.model.layers:
            x = self._run(block, x, rope, input_pos, mask)
            states.append(x)
        return states if layer_states else self.model.norm(x)

    def _run(self, block, x, rope, input_pos=None, mask=None):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # keep only each block's input; recompute its activations in backward
            return torch.utils.checkpoint.checkpoint(block, x, rope, input_pos, mask, use_reentrant=False)
        return block(x, rope, input_pos, mask)

    activation_checkpointing = False

    def forward(self, idx, targets=None, input_pos=None, head_fn=None, layer_inputs=None):
        """idx (B, T) -> logits (B, T, V); with targets (B, T) also the mean cross-entropy (targets == -100 ignored)
        and the return value is (logits, loss). With head_fn, returns head_fn(hidden (B, T, d), lm_head.weight)
        instead of logits: the training losses run there (ops.linear_kl) because under FSDP the head's weight
        is only gathered while the model's forward runs. layer_inputs {i: (B, T, d)} (ILD, zebra.py): returns
        {i: block i applied to that input} instead, each block on its own input (idx gives only the length)."""
        if layer_inputs is not None:
            rope = self._rope(torch.arange(idx.shape[1], device=idx.device))
            return {i: self._run(self.model.layers[i], h, rope) for i, h in layer_inputs.items()}
        h = self.forward_hidden(idx, input_pos)
        if head_fn is not None:
            return head_fn(h, self.lm_head.weight)
        logits = self.lm_head(h)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    # --- caches ---
    cache_len = None

    def setup_caches(self, batch_size, max_seq_len, dtype=None, device=None):
        """Allocate every layer's static cache: (B, n_kv, S, d_h) x2 for GQA, (B, S, r_kv + d_r) for MLA. Caches of
        the same shape are kept (a compiled decode step, CUDA graphs especially, wants the same buffers); what an
        earlier sequence left in them is cleared at the next prefill (clear_beyond) or by reset_caches()."""
        p = self.lm_head.weight
        dtype, device = dtype or p.dtype, device or p.device
        key = (batch_size, max_seq_len, dtype, str(device))
        if self.cache_len is not None and getattr(self, "_cache_key", None) == key:
            return
        for block in self.model.layers:
            block.mixer.cache = block.mixer.make_cache(batch_size, max_seq_len, dtype, device)
        self.cache_len, self._cache_key = max_seq_len, key

    def reset_caches(self):
        """Zero every allocated cache in place (the buffers stay: a compiled step keeps them). fill_, not a multiply:
        a NaN left by an earlier sequence must not survive."""
        for block in self.model.layers:
            if block.mixer.cache is not None:
                for b in block.mixer.cache.buffers():
                    b.zero_()

    def clear_caches(self):
        for block in self.model.layers:
            block.mixer.cache = None
        self.cache_len = self._cache_key = None

    def kv_cache_elements_per_token(self) -> int:
        """Numbers cached per token, summed over layers: 2 n_kv d_h per GQA layer, r_kv + d_r per MLA layer, none
        per Mamba2 layer (its cache is a fixed-size state: state_bytes)."""
        return sum(block.mixer.cache_elements_per_token() for block in self.model.layers)

    def state_bytes(self, batch_size, dtype=torch.bfloat16) -> int:
        """Bytes of the Mamba2 layers' fixed-size caches (conv window in `dtype`, state in fp32), whatever the
        context length."""
        return sum(b.mamba.state_bytes(batch_size, dtype) for b in self.model.layers if "mamba" in b._modules)

    def kv_cache_bytes(self, batch_size, seq_len, dtype=torch.bfloat16) -> int:
        """The whole cache of a batch at a context of seq_len: per-token caches plus the fixed states."""
        per_token = self.kv_cache_elements_per_token() * torch.empty((), dtype=dtype).element_size()
        return per_token * batch_size * seq_len + self.state_bytes(batch_size, dtype)

    def allocated_cache_bytes(self) -> int:
        """Bytes actually held by the allocated caches (to check kv_cache_bytes against)."""
        return sum(b.numel() * b.element_size() for blk in self.model.layers if blk.mixer.cache is not None
                   for b in blk.mixer.cache.buffers())

    # --- generation ---
    def decode_step(self, idx, input_pos):
        """One decode step: idx (B, 1) at position input_pos (1,) -> next-token logits (B, V), via the caches."""
        return self(idx, input_pos=input_pos)[:, -1]

    _compiled_step = None

    def compiled_decode_step(self, backend="inductor"):
        """decode_step under torch.compile (gpt-fast style: only the decode step is compiled; static shapes thanks
        to the static caches). CUDA: mode "reduce-overhead" (CUDA graphs; HIP graphs on ROCm); elsewhere default.
        backend="eager" only traces the step into one graph (seconds, where inductor takes a minute on a CPU)."""
        if self._compiled_step is None:
            mode = "reduce-overhead" if self.lm_head.weight.device.type == "cuda" and backend == "inductor" else None
            self._compiled_step = torch.compile(self.decode_step, backend=backend, mode=mode, fullgraph=True,
                                                dynamic=False)
        return self._compiled_step

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, compile=False):
        """Prefill the prompt idx (B, T0), then decode one token at a time from the caches. temperature 0 is greedy.
        Rows that emit eos_id keep emitting it; decoding stops once every row has. compile=True runs the decode
        steps through torch.compile (compiled once per model and cache shape). Returns (B, T0 + n) ids."""
        B, T0 = idx.shape
        if T0 + max_new_tokens > self.config.max_seq_len:
            raise BadInput(f"prompt {T0} + max_new_tokens {max_new_tokens} exceeds max_seq_len "
                           f"{self.config.max_seq_len}")
        self.setup_caches(B, T0 + max_new_tokens)
        self.reset_caches()  # a new sequence: nothing of the last one, whatever it held (a 1-token prompt too)
        step = self.compiled_decode_step() if compile else self.decode_step
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        pos = torch.arange(T0, device=idx.device)
        logits = self(idx, input_pos=pos)[:, -1]                                  # prefill, (B, V)
        out = [idx]
        for t in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k)                               # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            out.append(nxt[:, None])
            if t == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):  # the one host sync: stopping
                break
            logits = step(nxt[:, None], torch.tensor([T0 + t], device=idx.device))
        return torch.cat(out, dim=1)

    # --- checkpoints: Hugging Face folders of safetensors ---
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load an HF Llama folder (config.json + model.safetensors or a sharded index), a folder this project
        wrote (MLA fields in config.json), a DeepSeek-V2/V3-format MLA folder with dense MLPs (deepseek.py), or a
        hub id (downloaded through huggingface_hub when a hub is reachable). dtype None keeps the stored dtypes.
        The model is built on the meta device and the tensors assigned one by one: one copy of the weights at most."""
        path = resolve_checkpoint(path)
        hf = read_config_json(path)
        reader = checkpoint.reader_for(hf)
        config = read_model_config(path, reader.config if reader is not None else hf)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if config.tie_embeddings:
            expected.pop("lm_head.weight")
        sd = checkpoint.load_state(path, hf, expected, config.tie_embeddings, dtype, device)
        model.load_state_dict(sd, strict=False, assign=True)  # strict=False: the tied head is not in `sd`
        if config.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model._init_rope(device)
        return model

    def save_pretrained(self, path, run_config=None, max_shard_bytes=5 * 2**30, tokenizer=None, extra_files=(),
                        fmt="llama", **export):
        """Write the model as a folder (checkpoint.save_state): fmt "llama" this project's (a pure Llama loads in
        transformers' LlamaForCausalLM as is), "deepseek" the DeepSeek-V3 format that transformers, vLLM and SGLang
        load as DeepseekV3ForCausalLM. Atomic; an existing `path` is replaced only if it is empty or a folder this
        project wrote holding nothing else, anything else is refused before any work, never deleted."""
        checkpoint.save_state(path, self.config, self.state_dict(), fmt, run_config, max_shard_bytes, tokenizer,
                              extra_files, **export)


def resolve_dtype(name, device_type):
    """A dtype setting -> torch dtype: "auto" is bfloat16 on GPU and float32 on CPU (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        name, name)
    if name not in ("bfloat16", "float16", "float32", "float64"):
        raise BadInput(f"dtype={name!r}: use 'auto', 'bfloat16' (bf16), 'float16' (fp16) or 'float32' (fp32)")
    return getattr(torch, name)


@torch.no_grad()
def precision_probe(model, ids, dtype=torch.bfloat16, batch_size=4):
    """The model run in `dtype` (weights and activations; norms and softmax stay fp32 inside) against the same model
    in float32, on token ids (N, T): (KL(fp32 || dtype) per token, top-1 agreement). A healthy model loses little
    (bf16: agreement ~0.98-0.99); one whose outputs come from products of large weights that cancel (an ill-
    conditioned latent) passes every float32 check and falls apart here. The model itself is left as it was
    (copies are cast; the caller's train/eval mode applies: eval for a measurement)."""
    import copy
    from ops import kl_and_agreement
    dev = model.lm_head.weight.device
    ref = copy.deepcopy(model).float() if model.lm_head.weight.dtype != torch.float32 else model
    low = copy.deepcopy(model).to(dtype)
    kls, agree = [], []
    for b in range(0, len(ids), batch_size):
        x = ids[b:b + batch_size].to(dev)
        kl, a = kl_and_agreement(ref(x), low(x))
        kls.append(kl * len(x))
        agree.append(a * len(x))
    return sum(kls) / len(ids), sum(agree) / len(ids)


def sample(logits, temperature=0.0, top_k=None):
    """logits (B, V) -> next ids (B,). temperature 0: argmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)[:, 0]


def read_model_config(path, hf=None):
    """ModelConfig from a folder's config.json (or `hf`, that file already read), with errors that name the file."""
    return checkpoint.read_config(path, ModelConfig, hf)


if __name__ == "__main__":
    # python model.py [PATH_OR_HUB_ID] [--key=value ...]: greedy (or sampled) text from BOS or a prompt
    from configurator import configure
    init_from = "tests/fixtures/stories260K"   # model folder or hub id
    prompt = ""                # text to continue ("" = from BOS alone)
    chat = False               # render the prompt as a user message with the model's chat template
    tokenizer = ""             # "" = the model folder's own (the prompt needs one that encodes)
    device = "cpu"
    dtype = "float32"
    max_new_tokens = 60
    temperature = 0.0          # 0 = greedy
    top_k: int | None = None  # sample from the k most likely tokens
    seed = 1337
    configure(globals(), positional=("init_from",))  # python model.py FOLDER: a bare argument is the checkpoint
    torch.manual_seed(seed)
    folder = resolve_checkpoint(init_from)
    m = Transformer.from_pretrained(folder, dtype=resolve_dtype(dtype, torch.device(device).type), device=device).eval()
    if prompt or chat:
        tok = Tokenizer.from_name(tokenizer, folder)
        ids = tok.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0] if chat \
            else tok.encode(prompt, bos=m.config.bos_id is not None and tok.add_bos)
        decode, eos = tok.decode, (tok.eot_id if chat else tok.eos_id)
    else:
        ids, decode, eos = [m.config.bos_id], load_vocab_decoder(folder), None
    start = torch.tensor([ids], device=device)
    out = m.generate(start, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eos)
    print(decode(out[0, len(ids):].tolist()))
    print(f"KV cache: {m.kv_cache_elements_per_token()} numbers per token over {m.config.n_layers} layers"
          + (f", plus {m.state_bytes(1) / 1024:.1f} KiB of Mamba2 state per sequence" if m.config.mamba_layers else ""))
