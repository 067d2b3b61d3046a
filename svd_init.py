"""
Upcycle a pre-trained Llama's GQA attention into MLA: by SVD as X-EcoMLA's Algorithm 1 writes it (arXiv 2503.11132,
§4.1; init="svd"), or by init="rorope", which keeps a pre-trained model working before any training (RoRoPE shared
key, activation-aware factorisation, ranks under a cache budget; its pieces are in rorope.py, assembled here).

    python svd_init.py                                             # bundled stories260K, CPU, seconds
    python svd_init.py --init=rorope --kv_budget=0.5               # the same at half the cache, calibrated
    python svd_init.py --init=rorope --kv_budget=0.5 --latent_norm=kv  # + the c_kv norm engines need (deepseek.py)
    python svd_init.py --init=rorope --kv_budget=0.5 --latent_norm=kv --engine=sglang  # a shape SGLang serves
    python svd_init.py config/smollm2_135m_rorope50.py --init_from=DIR --out_dir=out/rorope50   # a real model
    python svd_init.py config/llama1b_kv64.py --init_from=meta-llama/Llama-3.2-1B-Instruct --out_dir=out/kv64
    python svd_init.py config/llama1b_kv64.py --init_from=DIR --device=cuda      # SVDs on the GPU

It writes a checkpoint folder that Transformer.from_pretrained loads and prints a per-layer table (ranks, energy
kept, parameters, KV cache per token and as a percentage of the source's).

What the SVD does, per converted layer (W in the paper's (in x out) orientation, d model width, H heads):
    Q:  W_Q = U_q S_q V_qᵀ (d x H d_h).  W_DQ = U_q[:, :r_q];  S_q V_qᵀ -> (r_q, H, d_h);
        W_UQ = its first d_qk dims of each head, W_QR = its last d_r dims (eqs. 8-9).
    KV: GQA heads repeated to all H heads, [W_K, W_V] = U_kv S_kv V_kvᵀ (d x 2 H d_h).  W_DKV = U_kv[:, :r_kv];
        W_UV = the V columns of S_kv V_kvᵀ; W_UK = the first d_qk dims of each head of its K columns (eqs. 10-11).
    RoPE key: W_KR = the last d_r columns of W_K averaged over heads (eq. 12).
    Ranks: fixed, or per layer and per matrix the smallest R whose energy sum_{j<=R} s_j^2 reaches delta of the
    total (eqs. 13-14).  W_O, norms, MLPs and embeddings are copied.

Choices where the paper is silent or ambiguous (each said again where it is made):
    - "Last d_r dims" of a head are taken literally, as Algorithm 1 does. In the rotate-half RoPE layout of HF
      checkpoints dim i is paired with i + d_h/2, so these are not whole rotation pairs: the init reproduces the
      teacher's attention only up to its positional part. We report how much that costs (--sweep) and keep it.
    - The joint KV SVD is computed on the un-repeated [W_K, W_V] (d x 2 n_kv d_h): repeating each KV head g = H/n_kv
      times only duplicates columns, so the repeated matrix has the same U, singular values times sqrt(g), and
      S V^T equal to the un-repeated one's with its columns duplicated. Exact, and 4x cheaper for Llama-3.2-1B.
      It also shows r_kv can usefully be at most min(d, 2 n_kv d_h): the repeated matrix has no more rank.
    - Dynamic ranks are the exact argmin of eq. 14 (the official code rounds up to a multiple of 8), decided per
      layer and per matrix; each layer's ranks live in that layer's own config entry (the official code writes a
      dynamic layer's rank into a shared config, so the next fixed-rank layer inherits it: not here).
    - init="random" (the paper's baseline): same ranks, each MLA matrix drawn N(0, s^2) with s the RMS of the SVD
      factor it replaces. A fixed std such as HF's 0.02 is near the trained scale of a 1B model but far below that
      of a tiny one, where it silences attention altogether; matching the scale makes the baseline differ from
      SVD in structure only, at any model size.
"""
import math
import os
import time
import warnings
from dataclasses import dataclass, fields, replace

import torch

from configurator import Settings
from deepseek import engine_aim, engine_ranks, llama3_unscaled
from errors import BadInput
from folders import check_not_in_a_live_run, check_replaceable, resolve_checkpoint
from model import ModelConfig, Transformer, latent_norm_kind, precision_probe, read_model_config, resolve_dtype
from ops import token_kl
from rorope import (FOLDS, NORM_INITS, calib_kl, _rorope_layer, _truncate, _weighted_svd, allocate_ranks,
                    calibrate, head_logits, calibrate_latent_norms, fold_problem, layer_moments, native_bf16,
                    refit_values, rope_pairs)

# The factorisation whitens by C + RIDGE * mean(diag C) * I, not by C: the latent's scale per direction is then
# bounded by construction (|c| <= |x| / sqrt(RIDGE * mean(diag C)) for ANY input x, RMS-normed as attention inputs
# are), whatever directions a calibration set happens to excite. With 1e-6 a direction the calibration barely saw was
# scaled up ~1e3 (and ~1e6 after the latent norm's fit): rows of W_DKV whose products cancel, a student that worked in
# float32 and was another model in bfloat16 (issue 33). 1e-2 costs nothing measurable where the calibration is rich
# (docs/init.md, "Latent norms").
RIDGE = 1e-2
SCORED = 4  # rorope: the candidates are scored on this many calibration sequences (the first; calibrate's batch)
# rope_unscaled=None on a Llama 3 source: a key of unscaled frequencies only is taken over the best candidate when its
# calibration KL is at most this much (relatively) higher: the price of a student every engine computes the same way
UNSCALED_SLACK = 0.05


def unscaled_count(cfg: ModelConfig):
    """A Llama 3 source (rope_type llama3): how many of its highest frequencies the scaling leaves alone; else None."""
    s = cfg.rope_scaling or {}
    return llama3_unscaled(cfg.head_dim, cfg.rope_theta, s) if s.get("rope_type", s.get("type")) == "llama3" else None


# -----------------------------------------------------------------------------
# Algorithm 1, as the paper writes it (init="svd", and its baseline init="random")

def energy_rank(s, delta):
    """Smallest R with sum_{j<=R} s_j^2 >= delta * sum_j s_j^2 (eq. 14). s: singular values, descending."""
    e = s.double().pow(2).cumsum(0)
    return int(torch.searchsorted(e, delta * e[-1]).item()) + 1 if delta < 1 else len(s)


def energy_kept(s, r):
    e = s.double().pow(2)
    return (e[:r].sum() / e.sum()).item()


def _svd(W):
    """float32 SVD on W's device, reduced (full_matrices=False); results in float32."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return U, S, Vh


def _algorithm1(model, layers, q_rank, kv_rank, q_energy, kv_energy, d_qk, d_r, init, latent_norm, seed, report,
                copy):
    """init "svd" (Algorithm 1) and "random" (its baseline)."""
    cfg = model.config
    d_h, H, n_kv, d = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.dim
    g = H // n_kv
    src = model.state_dict()
    new_sd, ranks = {}, {}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for i in sorted(layers):
        p = f"model.layers.{i}.self_attn."
        W_Q = src[p + "q_proj.weight"].T            # (d, H d_h)  paper orientation
        W_K = src[p + "k_proj.weight"].T            # (d, n_kv d_h)
        W_V = src[p + "v_proj.weight"].T            # (d, n_kv d_h)
        out_dtype = W_Q.dtype
        U_q, S_q, Vh_q = _svd(W_Q)                               # (d, m), (m,), (m, H d_h)
        # un-repeated: (d, m'), (m',), (m', 2 n_kv d_h). The repeated matrix has the same U and singular values
        # sqrt(g) S_kv: no energy fraction changes, and its S V^T is this S V^T with each head's columns repeated
        U_kv, S_kv, Vh_kv = _svd(torch.cat([W_K, W_V], dim=1))
        r_q = q_rank if q_rank is not None else energy_rank(S_q, q_energy)
        r_kv = kv_rank if kv_rank is not None else energy_rank(S_kv, kv_energy)
        ranks[i] = (r_q, r_kv)
        W_DQ = U_q[:, :r_q]                                             # (d, r_q)
        W_UQR = (S_q[:r_q, None] * Vh_q[:r_q]).view(r_q, H, d_h)        # (r_q, H, d_h)
        W_UQ = W_UQR[:, :, :d_qk].reshape(r_q, H * d_qk)
        W_QR = W_UQR[:, :, d_h - d_r:].reshape(r_q, H * d_r)            # the LAST d_r dims, literally (eq. 9)
        W_DKV = U_kv[:, :r_kv]                                          # (d, r_kv)
        W_UKV = S_kv[:r_kv, None] * Vh_kv[:r_kv]                        # (r_kv, 2 n_kv d_h), heads not yet repeated
        W_UK = W_UKV[:, :n_kv * d_h].view(r_kv, n_kv, 1, d_h).expand(r_kv, n_kv, g, d_h)  # KV head j -> heads j*g..
        W_UK = W_UK.reshape(r_kv, H, d_h)[:, :, :d_qk].reshape(r_kv, H * d_qk)           # first d_qk dims (eq. 11)
        W_UV = W_UKV[:, n_kv * d_h:].view(r_kv, n_kv, 1, d_h).expand(r_kv, n_kv, g, d_h).reshape(r_kv, H * d_h)
        W_KR = W_K.float().view(d, n_kv, d_h).mean(1)[:, d_h - d_r:]   # (d, d_r); mean over H repeated = over n_kv
        weights = dict(W_DQ=W_DQ, W_UQ=W_UQ, W_QR=W_QR, W_DKV=W_DKV, W_KR=W_KR, W_UK=W_UK, W_UV=W_UV)
        for name, W in weights.items():
            if init == "random":  # same shape and RMS as the SVD factor it replaces: only the structure differs
                W = torch.randn(W.shape, generator=gen).to(W.device) * W.float().pow(2).mean().sqrt()
            new_sd[p + name + ".weight"] = W.T.contiguous().to(out_dtype)  # nn.Linear holds (out, in)
        new_sd[p + "o_proj.weight"] = src[p + "o_proj.weight"].clone() if copy else src[p + "o_proj.weight"]
        new_sd.update(_norm_placeholders(p, latent_norm, r_q, r_kv, out_dtype, W_Q.device))
        if report is not None:
            n_attn = sum(v.numel() for k, v in new_sd.items() if k.startswith(p))
            report.append(dict(layer=i, r_q=r_q, r_kv=r_kv, q_energy=energy_kept(S_q, r_q),
                               kv_energy=energy_kept(S_kv, r_kv), params=n_attn,
                               src_params=sum(src[p + f"{x}_proj.weight"].numel() for x in "qkvo"),
                               cache=r_kv + d_r, src_cache=2 * n_kv * d_h))
    return _assemble(model, layers, new_sd, mla_config(cfg, ranks, d_qk, d_r, latent_norm), copy)


# -----------------------------------------------------------------------------
# The student every init assembles: the converted layers' config, the latent-norm placeholders, the model

def mla_config(cfg: ModelConfig, ranks: dict, d_qk, d_r, latent_norm="none", qk_rope_theta=0.0,
               rope_fold=1) -> ModelConfig:
    """The config of the upcycled model: `cfg` with layers {layer: (r_q, r_kv)} made MLA (added to the source's own
    MLA layers, if any, which keep their ranks). Each layer keeps its own ranks: nothing is shared between layers."""
    if cfg.mla_layers and latent_norm != cfg.latent_norm:
        raise BadInput(f"the source's MLA layers have latent_norm={cfg.latent_norm}; new layers must match")
    if cfg.mla_layers and (qk_rope_theta or cfg.rope_theta) != (cfg.qk_rope_theta or cfg.rope_theta):
        raise BadInput(f"the source's MLA layers rotate at theta {cfg.qk_rope_theta or cfg.rope_theta}; new layers "
                       f"would use {qk_rope_theta or cfg.rope_theta}: use the same qk_rope_dim and rope_ladder")
    ranks = dict(ranks)
    for j, i in enumerate(cfg.mla_layers):
        ranks[i] = (cfg.q_rank[j], cfg.kv_rank[j])
    order = sorted(ranks)
    return ModelConfig(**{**vars(cfg), "mla_layers": tuple(order), "q_rank": tuple(ranks[i][0] for i in order),
                          "kv_rank": tuple(ranks[i][1] for i in order), "qk_nope_dim": d_qk, "qk_rope_dim": d_r,
                          "latent_norm": latent_norm, "qk_rope_theta": qk_rope_theta, "rope_fold": rope_fold})


def _norm_placeholders(prefix, latent_norm, r_q, r_kv, dtype, device):
    """Latent-norm weights at 1 (calibrate_latent_norms then sets them)."""
    out = {}
    if latent_norm != "none":
        out[prefix + "kv_norm.weight"] = torch.ones(r_kv, dtype=dtype, device=device)
    if latent_norm == "both":
        out[prefix + "q_norm.weight"] = torch.ones(r_q, dtype=dtype, device=device)
    return out


def _assemble(model, layers, new_sd, new_cfg, copy):
    """The student Transformer: new_sd for the converted attentions, everything else from `model`."""
    cfg = model.config
    src = model.state_dict()
    with torch.device("meta"):
        student = Transformer(new_cfg)
    converted = tuple(f"model.layers.{i}.self_attn." for i in layers)
    for k, v in src.items():                  # everything that is not a converted attention is copied as is
        if not k.startswith(converted) and not (k == "lm_head.weight" and cfg.tie_embeddings):
            new_sd[k] = v.clone() if copy else v
    student.load_state_dict(new_sd, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    student._init_rope(model.lm_head.weight.device)
    for name in ("inv_freq_gqa", "inv_freq_mla"):  # a source moved to float64 has float64 rotary buffers: match it
        setattr(student, name, getattr(student, name).to(model.inv_freq_gqa.dtype))
    return student.train(model.training)


# -----------------------------------------------------------------------------
# One conversion's settings: what upcycle() builds, what the command lines take (svd_init.py, distill.py, zebra.py:
# each field is a --key=value setting there), what config.json records ("mla_conversion")

@dataclass
class Conversion(Settings):
    mla_layers: list | None = None  # None: all layers; a list of indices makes a hybrid
    q_rank: int | None = None  # fixed r_q ...
    kv_rank: int | None = None  # ... and r_kv, or dynamic:
    q_energy: float | None = None  # delta_q in (0, 1]
    kv_energy: float | None = None  # delta_kv in (0, 1]
    qk_nope_dim: int | None = None  # d_qk (None: d_h / 2; rorope: d_h)
    qk_rope_dim: int | None = None  # d_r (None: d_h / 2; rorope under kv_budget: chosen by the calibration)
    init: str = "svd"  # "svd" (Algorithm 1), "random" (its baseline) or "rorope" (needs calibration)
    kv_budget: float | None = None  # instead of kv_rank: a fraction of the source's cache (0.5) or numbers/token
    head_size: int = 0  # instead: r_kv + d_r of a shape vLLM serves (320, 512, 576; d_r 64), for export.py
    engine: str = ""  # aim at a shape this engine serves as it is: "vllm", "vllm-cpu", "sglang" (the largest within
                      # kv_budget, or kv_rank + qk_rope_dim checked), "llama.cpp", "transformers" (any shape: the
                      # same r_kv in every layer); recorded, so export.py checks against it
    rope_ladder: str = "highest"  # rorope, d_r < d_h, no folding: keep the d_r/2 "highest" frequencies, or "every"
                                  # c-th one
    rope_fold: int | None = None  # rorope: fold 1, 2, 4 or 8 adjacent frequencies into the shared key; None: the
                                  # calibration KL picks (1: exact rotation, no folding)
    rope_unscaled: bool | None = None  # Llama 3 sources, rorope: only frequencies the scaling leaves alone in the
                                       # shared key, so the export needs no rope_scaling (vLLM and SGLang serve any
                                       # as DeepSeek-YaRN); None: where the calibration KL says it costs little
                                       # (UNSCALED_SLACK), always when aimed at an engine (engine / head_size)
    refit: bool = True  # rorope: then W_UV and W_O refitted to the teacher's attention outputs
    rank_alloc: str = "auto"  # rorope under kv_budget: "uniform", "waterfill" or "auto" (the calibration KL picks)
    whiten: bool = True  # rorope ingredients (for ablations): activation-aware factorisation ...
    weight_errors: bool | None = None  # ... key / value errors weighted by their cost (None: with and without, the
                                       # calibration KL picks) ...
    kv_balance: float = 1.0  # ... and the weight of key errors against value errors
    latent_norm: str = "none"  # RMSNorm on "kv" (c_kv) or "both" (c_q, c_kv) latents: what serving needs
    latent_norm_init: str = "calibrated"  # their weights: "calibrated" per dimension, "scalar" or "ones"
    allow_qk_overlap: bool = False  # Algorithm 1 with d_qk + d_r > d_h (the paper's d_qk = d_r = d_h rows)

    def converts(self) -> bool:
        """Whether these settings convert anything (a rank, an energy, a budget or a head size given)."""
        return self.head_size > 0 or any(v is not None for v in (self.q_rank, self.q_energy, self.kv_rank,
                                                                  self.kv_energy, self.kv_budget))

    def calibrates(self) -> bool:
        """Whether this conversion needs calibration token ids (its init, or its latent norms' fit)."""
        return self.init == "rorope" or self.latent_norm != "none"

    def aimed(self, cfg: ModelConfig) -> "Conversion":
        """head_size and engine resolved into r_kv and d_r (deepseek.engine_ranks, deepseek.engine_aim): the
        engine's shape in every layer, so what it caches is what the budget gave."""
        c = replace(self)
        n = unscaled_count(cfg)
        if n and c.rope_unscaled is None and (c.engine or c.head_size) and c.init == "rorope":
            c.rope_unscaled = True  # served, any frequency Llama 3 scales would be another function (YaRN)
        max_rope = 2 * n if n and c.rope_unscaled else None
        if c.engine:
            L = cfg.n_layers if c.mla_layers is None else len(c.mla_layers)
            per_layer = None if c.kv_budget is None else \
                kv_budget_numbers(c.kv_budget, L * 2 * cfg.n_kv_heads * cfg.head_dim) // L
            aim = engine_aim(cfg, c.engine, per_layer, c.kv_rank, c.qk_rope_dim, c.head_size, c.mla_layers,
                             latent_norm_kind(c.latent_norm), max_rope)
            if aim is not None:
                c.kv_rank, c.qk_rope_dim, c.kv_budget, c.head_size = *aim, None, 0
            elif c.kv_budget is not None and c.rank_alloc == "waterfill":
                raise BadInput(f"engine={c.engine!r} caches the largest r_kv in every layer (the DeepSeek-V3 format "
                               "has one kv_lora_rank), so water-filled ranks would cost more than the budget. Fix: "
                               "rank_alloc='uniform' (or 'auto', which is then uniform)")
            elif c.kv_budget is not None:
                c.rank_alloc = "uniform"
        if c.head_size:
            c.kv_rank, c.qk_rope_dim = engine_ranks(cfg, c.head_size, c.mla_layers, c.latent_norm, max_rope,
                                                    kv_rank=c.kv_rank, qk_rope_dim=c.qk_rope_dim,
                                                    kv_budget=c.kv_budget, kv_energy=c.kv_energy)
            c.head_size = 0
        return c

    def checked(self, cfg: ModelConfig, calib_tokens=None, calib_seq_len=None) -> "Conversion":
        """These settings checked against a source config alone (no weights needed), and completed as the command
        lines complete them: head_size -> r_kv and d_r (deepseek.engine_ranks), an unset r_q / r_kv -> full rank.
        Scripts call it before any work, so a bad rank fails in a second, not after the data is tokenised.
        calib_tokens / calib_seq_len (given when the run calibrates): the calibration must fit the model's positions
        and this machine's memory."""
        c = self.aimed(cfg)
        layers = list(range(cfg.n_layers)) if c.mla_layers is None else c.mla_layers
        if not isinstance(layers, (list, tuple)):
            raise BadInput(f"mla_layers={layers!r} must be a list of layer indices, e.g. [{layers!r}]")
        if c.q_rank is None and c.q_energy is None:
            c.q_rank = min(cfg.dim, cfg.n_heads * cfg.head_dim)
        if c.kv_rank is None and c.kv_energy is None and c.kv_budget is None:
            c.kv_rank = min(cfg.dim, 2 * cfg.n_kv_heads * cfg.head_dim)
        d_qk, d_r = _defaults(cfg, c)
        _check_settings(cfg, c, list(layers), d_qk, d_r)
        if c.init == "rorope" and calib_tokens is not None:
            _check_calib_size(calib_tokens, c.q_rank, c.kv_rank, cfg)
        if calib_seq_len is not None and not 1 <= calib_seq_len <= cfg.max_seq_len:
            raise BadInput(f"calib_seq_len={calib_seq_len} is beyond the model's {cfg.max_seq_len} positions "
                           f"(max_position_embeddings). Fix: --calib_seq_len={min(512, cfg.max_seq_len)} or less")
        if calib_tokens is not None:
            need = calib_bytes(cfg, calib_tokens, len(layers), latent_norm_kind(c.latent_norm), c.latent_norm_init,
                               c.kv_rank)
            free = _available_memory() / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # each calibrates
            if need > 0.8 * free:
                fit = int(calib_tokens * 0.8 * free / need)
                raise BadInput(f"calib_tokens={calib_tokens} would hold about {need / 2**30:.1f} GiB during "
                               f"calibration, more than this machine's {free / 2**30:.1f} GiB available per process. "
                               f"Fix: calib_tokens <= {fit} (8192-32768 is plenty: see docs/init.md, calibration "
                               "sizes)")
        return c


# -----------------------------------------------------------------------------
# upcycle(): every init behind one call; init="rorope" is built here from rorope.py's pieces

@torch.no_grad()
def upcycle(model: Transformer, conversion: Conversion | None = None, *, calib=None, seed=0, report=None, copy=True,
            log=None, **settings) -> Transformer:
    """A new Transformer whose layers `mla_layers` (default all) are MLA initialised from `model`'s attention;
    every other tensor is cloned (training the result never touches `model`), or with copy=False shared with
    `model` (for convert-and-save: no second copy of the weights in memory; train neither while they share).

    The settings: a Conversion, or its fields as keywords (`upcycle(model, kv_rank=8, init="rorope")`), or both (the
    keywords replace the Conversion's fields). init: "svd" Algorithm 1 as the paper writes it; "random" its baseline;
    "rorope" the activation-aware init above, which needs `calib` (a LongTensor (N, T) of token ids) and has d_qk = d_h
    (whiten / weight_errors switch its ingredients off, for ablations; weight_errors=None builds the chosen shape with
    and without the cost weights and keeps the better). Ranks: fixed (q_rank, kv_rank), dynamic (q_energy, kv_energy:
    delta in (0, 1]), kv_budget (a fraction of the converted layers' source cache, or numbers per token): per-
    layer r_kv uniform or water-filled (rank_alloc; "auto" builds both) and, when qk_rope_dim is unset, d_r in
    {d_h, d_h/2, d_h/4}; the KL on 4 calibration sequences picks among the candidates; or head_size (an engine's
    r_kv + d_r, deepseek.engine_ranks). q_rank=None with no q_energy: full rank. d_qk, d_r default to d_h / 2 each for
    "svd". rope_fold (rorope): fold 1, 2, 4 or 8 adjacent frequencies into the shared key (rorope.py); None: the
    calibration KL picks it beside d_r. refit (rorope): then W_UV and W_O refitted in closed form to the teacher's
    attention outputs on `calib` (rorope.refit_values), from the teacher's attention inputs kept during calibration:
    N T d numbers a converted layer in the model's dtype, held until the refit (256 MiB at the 1B shape and 2048
    tokens; 2.3 GB for SmolLM2's 30 layers at 32K tokens). latent_norm "kv" / "both" adds RMSNorms on c_kv / on c_q
    and c_kv (serving engines need them: deepseek.py), set by calibrate_latent_norms (latent_norm_init) on `calib`,
    which every init then needs. seed: init="random"'s draw. The student's config records the conversion
    (`conversion`, config.json's "mla_conversion").
    If `report` is a list, one dict per converted layer is appended (ranks, energy kept, parameters, cache)."""
    unknown = sorted(set(settings) - {f.name for f in fields(Conversion)})
    if unknown:
        raise TypeError(f"upcycle() got {', '.join(unknown)}: not a Conversion setting (those are "
                        f"{', '.join(f.name for f in fields(Conversion))})")
    cfg = model.config
    c = replace(conversion or Conversion(), **settings).aimed(cfg)  # head_size / engine -> r_kv, d_r
    c.latent_norm = latent_norm_kind(c.latent_norm)  # True / False as "both" / "none"
    if c.latent_norm != "none" and c.latent_norm_init != "ones" and calib is None:
        raise BadInput(f"latent_norm={c.latent_norm!r} is initialised from calibration data: pass calib (token ids "
                       "(N, T)), or latent_norm_init='ones'")
    if c.latent_norm == "both" and c.latent_norm_init in ("calibrated", "diagonal"):
        warnings.warn("latent_norm='both' with a calibrated basis for c_q starts close to the no-norm model but "
                      "trained badly in the tiny ablation of docs/init.md (KL 1.73 -> 1.39, against 0.19 for "
                      "latent_norm='kv'). "
                      "Prefer 'kv' (a full-rank query is exported without a norm anyway), or "
                      "latent_norm_init='ones' for 'both'", UserWarning, stacklevel=3)
    bad = next((n for n, t in model.state_dict().items() if t.is_floating_point() and t.numel()
                and not torch.isfinite(torch.stack(torch.aminmax(t))).all()), None)  # NaN / Inf reach min or max:
    # one pass without a mask the size of the tensor (10x faster than isfinite(t).all(), 5 s at the 1B shape)
    if bad is not None:  # else a LinAlgError deep inside an SVD, or a NaN student
        raise BadInput(f"the source model's {bad} holds NaN or Inf: the checkpoint is damaged (or a training run "
                       "diverged). Fix: convert a finite checkpoint (an earlier one, or the original download)")
    check_kv_balance(c.kv_balance)
    if not isinstance(c.refit, bool):
        raise BadInput(f"refit={c.refit!r}: True (W_UV and W_O refitted to the teacher's outputs, init='rorope') or "
                       "False")
    layers = list(range(cfg.n_layers)) if c.mla_layers is None else [int(i) for i in c.mla_layers]
    if c.q_rank is None and c.q_energy is None:
        c.q_rank = min(cfg.dim, cfg.n_heads * cfg.head_dim)
    d_qk, d_r = _defaults(cfg, c)
    _check_settings(cfg, c, layers, d_qk, d_r)
    budget = None if c.kv_budget is None else kv_budget_numbers(c.kv_budget, len(layers) * 2 * cfg.n_kv_heads *
                                                                cfg.head_dim)
    student = INITS[c.init](model, c, layers, d_qk, d_r, budget, calib, seed, report, copy, log)
    calibrate_latent_norms(student, calib, layers, c.latent_norm_init)
    student.config.conversion = {f.name: getattr(c, f.name) for f in fields(c)}  # as completed here
    return student


def _init_algorithm1(model, c: Conversion, layers, d_qk, d_r, budget, calib, seed, report, copy, log):
    """init="svd" / "random": Algorithm 1 (under a budget: the same r_kv in every layer)."""
    cfg = model.config
    kv_rank = c.kv_rank if budget is None else min(budget // len(layers) - d_r,
                                                   min(cfg.dim, 2 * cfg.n_kv_heads * cfg.head_dim))
    return _algorithm1(model, layers, c.q_rank, kv_rank, c.q_energy, c.kv_energy, d_qk, d_r, c.init, c.latent_norm,
                       seed, report, copy)


def _init_rorope(model, c: Conversion, layers, d_qk, d_r, budget, calib, seed, report, copy, log):
    """init="rorope": the calibrated init, assembled from rorope.py's pieces (candidates scored by the calibration
    KL: d_r, fold, per-layer r_kv, the cost weights; then the refit)."""
    cfg = model.config
    d_h, H, n_kv, d = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.dim
    q_rank, kv_rank, q_energy, kv_energy = c.q_rank, c.kv_rank, c.q_energy, c.kv_energy
    whiten, weight_errors, kv_balance, refit = c.whiten, c.weight_errors, c.kv_balance, c.refit
    rope_ladder, rope_fold, rank_alloc, latent_norm = c.rope_ladder, c.rope_fold, c.rank_alloc, c.latent_norm
    say = log or (lambda *a: None)
    teacher_inputs = {} if refit else None  # kept for the refit: N T d numbers a layer
    first = []  # the final hidden states of the sequences the candidates are scored on
    stats, n_tok = calibrate(model, calib, layers, batch_size=SCORED, inputs=teacher_inputs, first_hidden=first)
    _check_calib_size(n_tok, q_rank, kv_rank, cfg)
    src = model.state_dict()
    f64 = lambda k: src[k].double().T  # paper orientation, float64
    W_Q_dtype = lambda i: src[f"model.layers.{i}.self_attn.q_proj.weight"].dtype
    ridge = {}
    for i, (C, _) in stats.items():  # in place: not a second (d, d) float64 matrix per layer
        C.diagonal().add_(RIDGE * C.diagonal().mean())
        ridge[i] = C
    q_fac, moments = {}, {}
    for i in layers:  # what no candidate (d_r, fold) changes: the query's factors, the moments; once a layer
        W_Q, W_K, W_V, W_O = (f64(f"model.layers.{i}.self_attn.{x}_proj.weight") for x in "qkvo")
        full = q_rank is not None and q_rank == min(d, H * d_h)  # nothing to truncate: no SVD (exact, and fast)
        gram = W_Q.T @ (ridge[i] @ W_Q) if whiten and not full else None      # shared by the two below
        moments[i] = layer_moments(W_Q, W_K, W_V, W_O, ridge[i], stats[i][1], cfg, kv_balance, gram)
        q_usv = None if full else _weighted_svd(W_Q, ridge[i], None, whiten, gram)
        del W_K, W_V, W_O
        r_q = q_rank if q_rank is not None else energy_rank(q_usv[1], q_energy)
        if q_usv is None:  # full r_q: the identity on whichever side is smaller
            eye = torch.eye(r_q, dtype=W_Q.dtype, device=W_Q.device)
            W_DQ, B_q = (eye, W_Q) if r_q == W_Q.shape[0] else (W_Q, eye)
        else:
            W_DQ, B_q = _truncate(W_Q, ridge[i], None, q_usv, r_q, whiten, gram)  # (d, r_q), (r_q, H d_h)
        del gram
        # W_DQ only ever leaves in the model's dtype: kept so (the same bits, 1/3 of the float64 kept across candidates)
        q_fac[i] = (W_DQ.to(W_Q_dtype(i)), B_q, energy_kept(q_usv[1], r_q) if q_usv else 1.0)
    n_unscaled = unscaled_count(cfg)  # Llama 3: a key of frequencies 0 .. n-1 alone needs no rope_scaling
    unscaled = lambda r, f: bool(n_unscaled) and f == 1 and rope_ladder == "highest" and r // 2 <= n_unscaled
    top = min(d_h, 2 * n_unscaled) if c.rope_unscaled else d_h  # rope_unscaled=True: no d_r beyond the band
    if d_r is not None:
        candidates = [d_r]
    else:  # budget, no d_r given: the largest ones that leave every layer some latent; the calibration KL decides
        candidates = [r for r in (d_h, d_h // 2, d_h // 4) if r >= 2 and r % 2 == 0 and budget >= len(layers) * (r + 1)
                      and (rope_ladder == "highest" or (d_h // 2) % (r // 2) == 0) and r <= top]
        if not candidates:  # a tight budget (or a narrow band): the largest d_r that leaves every layer r_kv >= 1
            r = min(top, (budget // len(layers) - 1) // 2 * 2)
            while rope_ladder == "every" and (d_h // 2) % (r // 2):
                r -= 2
            candidates = [r]
    # with the fold: unset, the calibration KL picks it among the valid ones
    folds = [rope_fold] if rope_fold is not None else [1] if c.rope_unscaled else FOLDS
    d_rs, candidates = candidates, [(r, f) for r in candidates for f in folds if not fold_problem(d_h, r, f)]
    if not candidates:  # a fold given, and a budget whose d_r it does not fit
        raise BadInput(fold_problem(d_h, d_rs[0], rope_fold) + f" (d_r {d_rs} fit this budget). Fix: rope_fold in "
                       f"{[f for f in FOLDS if not fold_problem(d_h, d_rs[0], f)]}, or None")

    def split(d_r_c, fold, weights):  # each layer's RoRoPE split and its weighted factorisation
        pairs = rope_pairs(d_h, d_r_c, rope_ladder if fold == 1 else "every")[0]
        parts = {}
        for i in layers:
            # converted per use: no float64 copy of every layer held across the candidates
            qkvo = [f64(f"model.layers.{i}.self_attn.{x}_proj.weight") for x in "qkvo"]
            W_KR, A, W, G = _rorope_layer(*qkvo, ridge[i], stats[i][1], cfg, pairs, weights, kv_balance, fold,
                                          moments[i])
            parts[i] = dict(W_KR=W_KR, A=A, W=W, G=G, usv=_weighted_svd(W, ridge[i], G, whiten))
        return pairs, parts

    def build(d_r_c, fold, pairs, parts, r_kv):
        exponent = rope_pairs(d_h, d_r_c, rope_ladder if fold == 1 else "every")[1]
        theta = cfg.rope_theta ** exponent if exponent != 1.0 else 0.0
        student, rows = _build_rorope(model, src, layers, parts, q_fac, ridge, r_kv, pairs, d_r_c, theta, whiten,
                                      latent_norm, copy, fold)
        for row in rows:
            row["rope_fold"] = fold
        return student, rows

    logits_t = None
    bf16 = native_bf16(model.lm_head.weight.device)  # scores only rank: bfloat16 where the hardware has it

    def score(student, what):  # KL on the first SCORED calibration sequences, latent norms bypassed (fitted later)
        nonlocal logits_t, idx
        if logits_t is None:  # the teacher's side from the calibration's float32 forward: the head alone
            idx = calib[:SCORED].to(model.lm_head.weight.device)
            logits_t = head_logits(model, first.pop(), bf16)
        kl = calib_kl(logits_t, student, idx, layers, bf16)
        say(f"rorope: {what}: KL on the calibration tokens {kl:.4f}")
        return kl

    # 1. the shape: d_r, fold and per-layer r_kv, with the cost weights unless told otherwise
    idx, best, best_u = None, None, None  # best_u: the best of the keys of unscaled frequencies only (Llama 3)
    for d_r_c, fold in candidates:
        pairs, parts = split(d_r_c, fold, weight_errors is not False)
        if budget is not None:
            spare = budget - len(layers) * d_r_c
            cap = min(d, 2 * n_kv * d_h)
            allocs = {"uniform": {i: min(spare // len(layers), cap) for i in layers}}
            if rank_alloc != "uniform":  # relative error per layer: raw spectra are not comparable across layers
                spectra = {i: parts[i]["usv"][1] for i in layers}
                allocs["waterfill"] = allocate_ranks({i: S / S.norm() for i, S in spectra.items()}, spare)
            if rank_alloc == "waterfill":
                del allocs["uniform"]
        else:
            allocs = {"fixed": {i: kv_rank if kv_rank is not None else energy_rank(parts[i]["usv"][1], kv_energy)
                                for i in layers}}
        for how, r_kv in allocs.items():
            student, rows = build(d_r_c, fold, pairs, parts, r_kv)
            if len(candidates) * len(allocs) == 1 and weight_errors is not None:
                best = (None, student, rows)
                continue
            kl = score(student, f"d_r {d_r_c}, fold {fold}, {how} r_kv (mean {sum(r_kv.values()) / len(layers):.1f})")
            if best is None or kl < best[0]:
                best = (kl, student, rows, d_r_c, fold, r_kv)
            if unscaled(d_r_c, fold) and (best_u is None or kl < best_u[0]):
                best_u = (kl, student, rows, d_r_c, fold, r_kv)
    if c.rope_unscaled is None and best_u is not None and not unscaled(best[3], best[4]):  # Llama 3: exact serving?
        take = best_u[0] <= best[0] * (1 + UNSCALED_SLACK)
        say(f"rorope: the best key (d_r {best[3]}, fold {best[4]}) keeps frequencies Llama 3's scaling changes; the best "
            f"of unscaled ones only (d_r {best_u[3]}) scores {best_u[0]:.4f} against {best[0]:.4f}: "
            + ("taken (within UNSCALED_SLACK; the export needs no rope_scaling)" if take else "not taken"))
        best = best_u if take else best
    best_u = None
    # 2. weight_errors=None: the same shape factorised without the cost weights (whitened only), where it scores
    # better (it does where the latent is tiny: docs/init.md, "Frequency folding")
    if weight_errors is None:
        kl, _, _, d_r_c, fold, r_kv = best
        student, rows = build(d_r_c, fold, *split(d_r_c, fold, False), r_kv)
        if score(student, f"d_r {d_r_c}, fold {fold}, without the cost weights") < kl:
            best = (None, student, rows)
    student = best[1]
    if refit:  # 3. the chosen student's W_UV and W_O fitted to what the teacher's attention outputs
        refit_values(student, model, calib, layers, SCORED, teacher_inputs=teacher_inputs)  # calibrate's batches
        if log is not None:
            score(student, "W_UV and W_O refitted (in-sample: the refit saw these tokens)")
    if report is not None:
        report.extend(best[2])
    return student


def _build_rorope(model, src, layers, parts, q_fac, ridge, r_kv, pairs, d_r_c, theta, whiten, latent_norm, copy,
                  fold=1):
    """The rorope student for one choice of d_r and per-layer r_kv, from the query's factors q_fac {layer: (W_DQ,
    B_q, energy kept)}. -> (student, report rows)."""
    cfg = model.config
    d_h, H, n_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    new_sd, ranks, rep = {}, {}, []
    for i in layers:
        p = f"model.layers.{i}.self_attn."
        W_KR, A, W, G, usv = (parts[i][k] for k in ("W_KR", "A", "W", "G", "usv"))
        W_DQ, B_q, q_kept = q_fac[i]
        r_q = B_q.shape[0]
        ranks[i] = (r_q, r_kv[i])
        W_DKV, B_kv = _truncate(W, ridge[i], G, usv, r_kv[i], whiten)           # (d, r_kv), (r_kv, 2 n_kv d_h)
        c = math.sqrt((d_h + d_r_c) / d_h)  # MLA divides scores by √(d_qk + d_r) = √(d_h + d_r), Llama by √d_h
        Bq = B_q.view(r_q, H, d_h)
        A_h = A[torch.arange(H) // (H // n_kv)]                                 # (H, d_h/2, d_r/2): each head's group
        cBq = c * Bq
        W_QR = torch.cat([torch.einsum("rhi,hit->rht", cBq[:, :, half], A_h) for half in (slice(0, d_h // 2),
                                                                                        slice(d_h // 2, d_h))], -1)
        rep_heads = lambda B: B.view(-1, n_kv, 1, d_h).expand(-1, n_kv, H // n_kv, d_h).reshape(-1, H * d_h)
        weights = dict(W_DQ=W_DQ, W_UQ=c * B_q, W_QR=W_QR.reshape(r_q, H * d_r_c),
                       W_DKV=W_DKV, W_KR=W_KR, W_UK=rep_heads(B_kv[:, :n_kv * d_h]),
                       W_UV=rep_heads(B_kv[:, n_kv * d_h:]))
        dt = src[p + "q_proj.weight"].dtype
        for name, Wt in weights.items():
            new_sd[p + name + ".weight"] = Wt.T.contiguous().to(dt)
        new_sd[p + "o_proj.weight"] = src[p + "o_proj.weight"].clone() if copy else src[p + "o_proj.weight"]
        new_sd.update(_norm_placeholders(p, latent_norm, r_q, r_kv[i], dt, B_q.device))
        n_attn = sum(v.numel() for k, v in new_sd.items() if k.startswith(p))
        rep.append(dict(layer=i, r_q=r_q, r_kv=r_kv[i], q_energy=q_kept,
                        kv_energy=energy_kept(usv[1], r_kv[i]), params=n_attn,
                        src_params=sum(src[p + f"{x}_proj.weight"].numel() for x in "qkvo"),
                        cache=r_kv[i] + d_r_c, src_cache=2 * n_kv * d_h))
    return _assemble(model, layers, new_sd, mla_config(cfg, ranks, d_h, d_r_c, latent_norm, theta, fold), copy), rep


# -----------------------------------------------------------------------------
# Settings, checked before any weight is read

INITS = {"svd": _init_algorithm1, "random": _init_algorithm1, "rorope": _init_rorope}  # upcycle's dispatch
LADDERS = ("highest", "every")
ALLOCS = ("auto", "uniform", "waterfill")


def _check_settings(cfg: ModelConfig, c: Conversion, layers, d_qk, d_r):
    """The Conversion `c` (with q_rank completed) against the source config; d_qk, d_r as _defaults completes them."""
    q_rank, kv_rank, q_energy, kv_energy, init = c.q_rank, c.kv_rank, c.q_energy, c.kv_energy, c.init
    kv_budget, rope_ladder, rank_alloc, rope_fold = c.kv_budget, c.rope_ladder, c.rank_alloc, c.rope_fold
    latent_norm, latent_norm_init, allow_qk_overlap = c.latent_norm, c.latent_norm_init, c.allow_qk_overlap
    n = cfg.n_layers
    if not layers or len(set(layers)) != len(layers) or not all(isinstance(i, int) and 0 <= i < n for i in layers):
        raise BadInput(f"mla_layers={layers} must be distinct layer indices in [0, {n})")
    already = [i for i in layers if cfg.layer_type(i) != "gqa"]
    if already:
        kinds = sorted({cfg.layer_type(i).replace('mla', 'MLA').replace('mamba2', 'Mamba2') for i in already})
        raise BadInput(f"layers {already} are already {' / '.join(kinds)}; upcycle converts GQA layers only")
    if cfg.v_head_dim != cfg.head_dim:
        raise BadInput(f"d_v must equal d_h (paper §4.1), got v_head_dim={cfg.v_head_dim}, head_dim={cfg.head_dim}")
    if init not in INITS:
        raise BadInput(f"init={init!r}: use one of {', '.join(map(repr, INITS))}")
    d_h = cfg.head_dim
    if init == "rorope" and d_qk != d_h:
        raise BadInput(f"init='rorope' keeps each head's whole query/key as its no-RoPE part: qk_nope_dim must be "
                       f"d_h = {d_h} (or unset), got {d_qk}")
    if d_r is not None and d_r > d_h:
        raise BadInput(f"qk_rope_dim={d_r} > d_h = {d_h}: the shared RoPE key has at most one pair per source "
                       f"frequency (d_h / 2 of them). Fix: qk_rope_dim <= {d_h}")
    if rank_alloc not in ALLOCS:
        raise BadInput(f"rank_alloc={rank_alloc!r}: use one of {', '.join(map(repr, ALLOCS))}")
    if latent_norm_kind(latent_norm) != "none" and latent_norm_init not in NORM_INITS:
        raise BadInput(f"latent_norm_init={latent_norm_init!r}: use one of {', '.join(map(repr, NORM_INITS))}")
    if cfg.mla_layers and latent_norm_kind(latent_norm) != cfg.latent_norm:
        raise BadInput(f"the source's MLA layers have latent_norm={cfg.latent_norm!r}; new layers must match "
                       f"(got {latent_norm!r})")
    if rope_ladder not in LADDERS:
        raise BadInput(f"rope_ladder={rope_ladder!r}: use 'highest' (the d_r/2 highest frequencies) or 'every' "
                       "(every (d_h/d_r)-th frequency)")
    if init == "rorope" and d_r is not None and rope_ladder == "every" and (d_h // 2) % (d_r // 2 or 1):
        raise BadInput(f"rope_ladder='every' needs d_r/2 to divide d_h/2 = {d_h // 2} (every c-th frequency of a "
                       f"standard ladder); qk_rope_dim={d_r} does not. Fix: a d_r with d_h/d_r a whole number, "
                       "or rope_ladder='highest'")
    if rope_fold is not None and (rope_fold not in FOLDS or isinstance(rope_fold, bool)):
        raise BadInput(f"rope_fold={rope_fold!r}: use one of {', '.join(map(str, FOLDS))}, or None (the "
                       "calibration picks it)")
    if rope_fold not in (None, 1) and init != "rorope":
        raise BadInput(f"rope_fold={rope_fold} folds frequencies into the shared key of init='rorope'; "
                       f"init={init!r} has none. Fix: init='rorope', or drop rope_fold")
    if init == "rorope" and rope_fold is not None and d_r is not None and fold_problem(d_h, d_r, rope_fold):
        ok = [f for f in FOLDS if not fold_problem(d_h, d_r, f)]
        raise BadInput(fold_problem(d_h, d_r, rope_fold) + f". Fix: rope_fold in {ok} for this d_r, or another "
                       "qk_rope_dim")
    band = unscaled_count(cfg)
    if c.rope_unscaled:  # the first rule it breaks, and its fix
        broken = next(((why, fix) for bad, why, fix in (
            (band is None, "the source has no Llama 3 rope scaling: every frequency is served exactly already",
             "rope_unscaled=None"),
            (band == 0, "this source's scaling touches every frequency", "rope_unscaled=None"),
            (init != "rorope", "it keeps whole frequencies of init='rorope''s shared key", "init='rorope'"),
            (rope_ladder != "highest" or rope_fold not in (None, 1), "it keeps the highest frequencies unfolded",
             "rope_ladder='highest' and rope_fold=1 (or unset)"),
            (d_r is not None and band and d_r // 2 > band,
             f"only the {band} highest frequencies are unscaled", f"qk_rope_dim <= {2 * (band or 0)}")) if bad), None)
        if broken:
            raise BadInput(f"rope_unscaled=True: {broken[0]}. Fix: {broken[1]}")
    if cfg.mla_layers and (d_qk, d_r) != (cfg.qk_nope_dim, cfg.qk_rope_dim):
        raise BadInput(f"the source already has MLA layers with d_qk={cfg.qk_nope_dim}, d_r={cfg.qk_rope_dim}; "
                       f"new layers must use the same (got {d_qk}, {d_r})")
    if d_r is not None and not (1 <= d_qk <= d_h and 2 <= d_r <= d_h and d_r % 2 == 0):
        raise BadInput(f"need 1 <= d_qk <= d_h and an even 2 <= d_r <= d_h (d_h={d_h}); got d_qk={d_qk}, d_r={d_r}")
    if init != "rorope" and d_r is not None and d_qk + d_r > d_h and not allow_qk_overlap:
        raise BadInput(f"d_qk + d_r = {d_qk + d_r} > d_h = {d_h}: the no-RoPE and RoPE slices of each head would "
                       "overlap. Lower them, or set allow_qk_overlap=True (the paper's d_qk = d_r = d_h rows do this)")
    max_q, max_kv = min(cfg.dim, cfg.n_heads * d_h), min(cfg.dim, 2 * cfg.n_kv_heads * d_h)
    if kv_budget is not None:
        if kv_rank is not None or kv_energy is not None:
            raise BadInput(f"give kv_budget or kv_rank/kv_energy, not both (got kv_budget={kv_budget}, "
                           f"kv_rank={kv_rank}, kv_energy={kv_energy})")
        src = len(layers) * 2 * cfg.n_kv_heads * d_h
        total = kv_budget_numbers(kv_budget, src)
        least = len(layers) * ((d_r if d_r is not None else 2) + 1)  # every layer needs d_r + at least r_kv 1
        if total < least:
            raise BadInput(f"kv_budget={kv_budget} is {total} numbers per token over {len(layers)} layers, below "
                           f"what d_r = {d_r if d_r is not None else 2} and r_kv = 1 alone cost ({least}). Fix: a "
                           "larger kv_budget" + (" or a smaller qk_rope_dim" if d_r is not None else ""))
        # checked below as a fixed rank of 1; the allocation happens with the weights
        kv_rank = 1
    for name, rank, energy, hi in (("q", q_rank, q_energy, max_q), ("kv", kv_rank, kv_energy, max_kv)):
        if (rank is None) == (energy is None):
            raise BadInput(f"give exactly one of {name}_rank (fixed) and {name}_energy (dynamic)"
                           + (" or kv_budget" if name == "kv" else "")
                           + f"; got {name}_rank={rank}, {name}_energy={energy}")
        if rank is not None and not (isinstance(rank, int) and 1 <= rank <= hi):
            why = " (the joint [W_K, W_V] of a GQA model has rank at most min(d, 2 n_kv d_h))" if name == "kv" else ""
            raise BadInput(f"{name}_rank={rank} must be an integer in [1, {hi}]{why}")
        if energy is not None and not (0 < energy <= 1):
            raise BadInput(f"{name}_energy={energy} must be in (0, 1]")


def kv_budget_numbers(kv_budget, src_numbers):
    """kv_budget as cache numbers per token over the converted layers: a fraction in (0, 1] of the source's
    `src_numbers`, or an integer > 1 taken as numbers per token."""
    if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)) or kv_budget <= 0:
        raise BadInput(f"kv_budget={kv_budget!r}: give a fraction in (0, 1] of the source's cache (0.5) or an "
                       "integer number of cached numbers per token over the converted layers")
    if isinstance(kv_budget, float) and kv_budget <= 1:
        return int(kv_budget * src_numbers)
    if float(kv_budget) != int(kv_budget) or kv_budget > src_numbers:
        raise BadInput(f"kv_budget={kv_budget}: a count must be a whole number <= the source's {src_numbers} "
                       "numbers per token (or give a fraction in (0, 1])")
    return int(kv_budget)


def _defaults(cfg, c: Conversion):
    """d_qk, d_r when unset: d_h / 2 each (Algorithm 1); rorope: d_qk = d_h, and d_r chosen later under a budget."""
    d_h = cfg.head_dim
    if cfg.mla_layers:  # adding layers to an MLA model: they share its d_qk and d_r
        return (c.qk_nope_dim or cfg.qk_nope_dim), (c.qk_rope_dim or cfg.qk_rope_dim)
    d_qk = c.qk_nope_dim if c.qk_nope_dim is not None else (d_h if c.init == "rorope" else d_h // 2)
    d_r = c.qk_rope_dim if c.qk_rope_dim is not None else (None if c.init == "rorope" and c.kv_budget else d_h // 2)
    return d_qk, d_r


def check_kv_balance(kv_balance):
    if not (isinstance(kv_balance, (int, float)) and 0 < kv_balance < float("inf")):
        raise BadInput(f"kv_balance={kv_balance!r}: the weight of key errors against value errors must be a positive "
                       "number (1 weighs each by its cost; smaller favours the values). Fix: kv_balance=1.0")


def calib_bytes(cfg: ModelConfig, n_tokens, n_layers, latent_norm="none", latent_norm_init="calibrated",
                kv_rank=None):
    """Memory the calibration holds at once: the token ids, float64 second moments (d, d) per layer and, to fit the
    latent norms' steady basis (calibrated / diagonal), every calibration token's latents in fp32, all layers."""
    need = 8 * n_tokens + 8 * n_layers * (cfg.dim + 1) * cfg.dim
    if latent_norm != "none" and latent_norm_init in ("calibrated", "diagonal"):
        r = (kv_rank or min(cfg.dim, 2 * cfg.n_kv_heads * cfg.head_dim)) + \
            (min(cfg.dim, cfg.n_heads * cfg.head_dim) if latent_norm == "both" else 0)
        need += 4 * n_tokens * r * n_layers
    return need


def _available_memory():
    """Bytes of memory available to a new allocation (Linux: MemAvailable; elsewhere: unbounded)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return float("inf")


def _check_calib_size(n_tokens, q_rank, kv_rank, cfg):
    need = max(q_rank or 0, kv_rank or 0, min(cfg.dim, 2 * cfg.n_kv_heads * cfg.head_dim) if kv_rank is None else 0)
    if n_tokens < need:
        raise BadInput(f"calibration has {n_tokens} tokens, fewer than the rank {need} it must estimate (the "
                       f"activation second moments are then rank-deficient). Fix: more calibration tokens "
                       f"(calib_tokens; a few x d = {cfg.dim} is the least useful, 8192+ recommended)")


# -----------------------------------------------------------------------------
# Measuring an initialisation: KL(teacher || student) per token on text the teacher writes

@torch.no_grad()
def teacher_text(teacher, n_seq, seq_len, seed=0, temperature=1.0):
    """Held-out text sampled from the teacher itself (from BOS): the distribution the student should match. Sampled
    16 sequences at a time (memory bounded whatever n_seq; the first 16 are what one batch would give)."""
    torch.manual_seed(seed)
    out = []
    for b in range(0, n_seq, 16):  # 16 sequences at a time: the caches of n_seq at once could exhaust memory
        start = torch.full((min(16, n_seq - b), 1), teacher.config.bos_id, dtype=torch.long,
                           device=teacher.lm_head.weight.device)
        out.append(teacher.generate(start, seq_len - 1, temperature=temperature))
    return torch.cat(out)


@torch.no_grad()
def kl_per_token(teacher, student, idx):
    """Mean over tokens of KL(p_teacher || p_student) in nats, and the teacher's mean entropy."""
    lp_t = teacher(idx).float().log_softmax(-1)
    lp_s = student(idx).float().log_softmax(-1)
    return token_kl(lp_t, lp_s).mean().item(), -(lp_t.exp() * lp_t).sum(-1).mean().item()


FRAGILE_KL = 0.05  # KL(float32 || bfloat16) per token above which a model is called fragile (healthy: ~1e-3)


def precision_line(student, ids):
    """One line: the student run in bfloat16 against itself in float32 (model.precision_probe), with a warning where
    it does not survive the cast (what an engine serving bf16 would get)."""
    kl, agree = precision_probe(student, ids, torch.bfloat16)
    line = (f"bfloat16 probe: KL(float32 || bfloat16) {kl:.2e} nats/token, top-1 agreement {100 * agree:.1f}% on "
            f"{ids.numel()} tokens")
    if not kl <= FRAGILE_KL:
        line += (f"\nWARNING: this student is numerically fragile: in bfloat16 it is another model (KL above "
                 f"{FRAGILE_KL}). Serve and train it in float32, or re-convert (a different calibration, "
                 "latent_norm='none')")
    return line


def print_table(report, model_cfg, student):
    src_cache = 2 * model_cfg.n_kv_heads * model_cfg.head_dim
    print(f"{'layer':>5} {'r_q':>6} {'r_kv':>6} {'E_q':>7} {'E_kv':>7} {'params':>11} {'src params':>11} "
          f"{'cache/tok':>9} {'% src':>7}")
    for r in report:
        print(f"{r['layer']:>5} {r['r_q']:>6} {r['r_kv']:>6} {r['q_energy']:>7.4f} {r['kv_energy']:>7.4f} "
              f"{r['params']:>11,} {r['src_params']:>11,} {r['cache']:>9} {100 * r['cache'] / r['src_cache']:>6.2f}%")
    tot_src = model_cfg.n_layers * src_cache
    tot = student.kv_cache_elements_per_token()
    n_params = sum(p.numel() for p in student.parameters())
    print(f"KV cache: {tot} numbers per token over {model_cfg.n_layers} layers vs {tot_src} for the source: "
          f"{100 * tot / tot_src:.2f}% ({tot_src / tot:.1f}x smaller); parameters {n_params:,}")


if __name__ == "__main__":
    from configurator import configure, require
    from data import BUNDLED_SFT, calibration_ids, check_sources
    from folders import check_apart
    # -----------------------------------------------------------------------------
    # settings (a config file, then --key=value)
    init_from = "tests/fixtures/stories260K"   # HF Llama folder or hub id
    out_dir = "out/svd_init"   # a new or empty folder, or one svd_init wrote before (anything else is refused)
    tokenizer = ""             # recorded in out_dir: "" = the source folder's own; or "bytes", "llama3", a folder
    conversion = Conversion()  # its fields are settings here: --init, --kv_rank, --kv_budget, ... (--help lists them)
    calib_data = list(BUNDLED_SFT)  # rorope's calibration text: the bundled SFT mix
    calib_tokens = 8192        # calibration tokens (seeded choice of whole sequences; `seed`)
    calib_seq_len = 512
    data_cache = "out/data_cache"
    device = "cpu"
    dtype = "float32"          # the dtype the model is loaded and saved in (the SVD itself is always float32)
    seed = 0
    config = configure(globals())
    # -----------------------------------------------------------------------------
    require(config, calib_tokens=(1, None), calib_seq_len=(1, None), seed=(0, None))
    check_kv_balance(conversion.kv_balance)
    folder = resolve_checkpoint(init_from)
    calibrating = conversion.calibrates()
    # pre-flight: output folder, settings and tokenizer, before the weights are read
    check_apart(out_dir, "out_dir", {"init_from": folder, **{f"calib_data[{i}]": c for i, c in
                                                             enumerate(calib_data)}}, {"data_cache": data_cache})
    check_replaceable(os.path.abspath(out_dir))
    check_not_in_a_live_run(out_dir)
    src_cfg = read_model_config(folder)
    asked = conversion
    conversion = conversion.checked(src_cfg, calib_tokens=calib_tokens if calibrating else None,
                                    calib_seq_len=calib_seq_len if calibrating else None)
    if asked.head_size:  # an engine's head size fixed r_kv and d_r (deepseek.engine_ranks)
        print(f"head_size {asked.head_size}: r_kv {conversion.kv_rank} + d_r {conversion.qk_rope_dim} in every layer")
    if calibrating:
        check_sources(calib_data)
    from tokenizer import Tokenizer, check_tokenizer_for
    try:
        tok = Tokenizer.from_name(tokenizer, folder)
    except (FileNotFoundError, ValueError) as e:
        if tokenizer:
            raise
        tok = None  # stories260K: llama2.c's decode table only; it is carried over below
        print(f"note: no tokenizer recorded in {out_dir}: {str(e).split('. Fix')[0]}")
    if tok is not None:
        check_tokenizer_for(tok, folder, "source")
    calib = None
    if calibrating and tok is not None:  # before the weights: too little data fails here
        calib = calibration_ids(calib_data, tok, data_cache, calib_tokens, calib_seq_len, seed)
        where = calib_data
    teacher = Transformer.from_pretrained(folder, dtype=resolve_dtype(dtype, torch.device(device).type),
                                          device=device).eval()
    if calibrating and calib is None:  # no tokenizer to read text with (stories260K): text the source writes itself
        calib = teacher_text(teacher, -(-calib_tokens // calib_seq_len), calib_seq_len, seed)
        where = "text sampled from the source (it has no tokenizer to read calib_data)"
    if calib is not None:
        print(f"calibration: {calib.numel()} tokens ({len(calib)} x {calib_seq_len}, seed {seed}) of {where}")
    report = []
    t0 = time.time()
    student = upcycle(teacher, conversion, calib=calib, seed=seed, report=report, copy=False,
                      log=print).eval()  # the teacher's untouched tensors are shared, not duplicated
    print(f"upcycled {init_from} in {time.time() - t0:.1f} s ({conversion.init} init)")
    print_table(report, teacher.config, student)
    if teacher.config.vocab_size <= 1024 and teacher.config.bos_id is not None:  # tiny model: measure it right away
        idx = teacher_text(teacher, 8, 128, seed)
        kl, ent = kl_per_token(teacher, student, idx)
        print(f"KL(teacher||student) at init: {kl:.3f} nats/token on 8 x 128 teacher-sampled tokens "
              f"(teacher entropy {ent:.3f})")
    # the low-precision probe: a student whose latent is ill-conditioned works in float32 and breaks in bfloat16
    if teacher.config.bos_id is not None:
        probe_ids = teacher_text(teacher, 4, min(128, teacher.config.max_seq_len), seed)
    else:  # no BOS to start the source's own text from: the calibration text, or any ids
        probe_ids = calib[:4, :128] if calib is not None else torch.randint(
            0, teacher.config.vocab_size, (4, min(128, teacher.config.max_seq_len)),
            generator=torch.Generator().manual_seed(seed))
    print(precision_line(student, probe_ids))
    table = os.path.join(folder, "tokenizer_tok512.json")  # llama2.c's decode table: python model.py reads it
    student.save_pretrained(out_dir, run_config=config, tokenizer=tok,
                            extra_files=[table] if tok is None and os.path.exists(table) else ())
    print(f"saved {out_dir} (config.json, safetensors, run_config.json, the tokenizer); "
          f"sample from it with: python model.py {out_dir}")
