"""
Zebra-Llama (arXiv 2505.17272): a hybrid composed from one pre-trained Llama, most layers Mamba2 (mamba2.py), a
few MLA (svd_init.py), so the cache is a fixed-size state plus a small per-token latent. This file builds it:
Mamba2 layers from attention weights, the choice of which layers stay MLA under a cache budget, and the
intermediate-layer distillation loss (ILD) that distill.py trains it with before the end-to-end KL.

    python zebra.py                                         # tiny teacher -> 2 MLA + 4 Mamba2 layers, CPU, seconds
    python zebra.py --mla_fraction=0.25 --placement=uniform # the published way of choosing the MLA layers
    python zebra.py --init_from=DIR --mla_fraction=0.125 --kv_rank=32 --qk_rope_dim=32 --out_dir=out/zebra8
    python distill.py --student_from=out/zebra --teacher=assets/models/tiny_teacher --ild=True --out_dir=out/ild
    python distill.py --student_from=out/ild/final --teacher=assets/models/tiny_teacher --out_dir=out/e2e
    python dpo.py --init_from=out/e2e/final                 # DPO runs on the hybrid as on any model here
(torchrun --standalone --nproc_per_node=N distill.py ... for several processes or GPUs, as everywhere.)

Mamba2 from attention (MambaInLlama's mapping, which Zebra-Llama uses): in_proj rows [z, x, B, C, dt] with
x <- W_V, B <- W_K, C <- W_Q (x and B keep the n_kv heads and are repeated to the H heads as GQA repeats K and V),
out_proj <- W_O; nheads = H, headdim = d_state = d_h. With no decay (A = 0), dt = 1 and an identity conv the scan
is then causal linear attention of SiLU(q) and SiLU(k) over SiLU(v): the attention without its softmax or RoPE.
z, dt and dt_bias (log-uniform in [1e-3, 0.1]), A_log (log of U[1, 16]), D = 1 and the conv are fresh; the MLP
and norms are copied. Two choices of ours (docs/zebra.md measures both against the published ones):
  ssm_gain="calibrated"  the per-head RMSNorm's weights fitted by least squares to the attention output they
                         replace (fit_gains), instead of 1: a Mamba2 layer at weight 1 can move the residual stream
                         further than removing the attention would (SmolLM2, 15 Mamba2 layers: KL at init 8.4,
                         5.1 fitted)
  conv_init="identity"   tap 1 on the current token instead of Mamba2's random conv, so the mapping above holds

Placement (placement="sensitivity"): each layer's sensitivity is KL(source || source with that one layer
replaced by its Mamba2 init) on calibration tokens; the most sensitive layers stay MLA. placement="uniform" is
the published hand-picked pattern: every (L / n_mla)-th layer from layer 0 (1B, 8 + 8: [0, 2, ..., 14]).

ILD (distill.py ild=True): every converted layer i runs on the teacher's hidden state h_i and is trained to
produce the teacher's next one: loss = sum_i mean over tokens ||block_i(h_i) - h_{i+1}||_2. The layers do not see
each other, so one hybrid trained this way gets exactly what the published separate all-MLA and all-Mamba2 ILD
runs give its layers, at one run's cost. (The published loss adds the same norm on the mixer outputs alone.)
"""
import os
import time
from dataclasses import replace

import torch

from errors import BadInput
from mamba2 import ssm_init
from folders import check_not_in_a_live_run, check_replaceable, resolve_checkpoint
from model import ModelConfig, Transformer, read_model_config, resolve_dtype
from rorope import calib_kl, calib_logits
from svd_init import Conversion, _assemble, kv_budget_numbers, upcycle

CONV_INITS = ("identity", "random")
PLACEMENTS = ("sensitivity", "uniform")
GAINS = ("calibrated", "ones")


# -----------------------------------------------------------------------------
# Mamba2 layers from attention


def mamba_config(cfg: ModelConfig, layers) -> ModelConfig:
    """`cfg` with `layers` (GQA layers) made Mamba2, shaped by the source's heads."""
    return ModelConfig(**{**vars(cfg), "mamba_layers": tuple(sorted(set(cfg.mamba_layers) | set(layers))),
                          "ssm_d_inner": 0, "ssm_d_xb": 0, "ssm_d_state": 0})


def check_mamba_layers(cfg: ModelConfig, layers):
    n = cfg.n_layers
    if len(set(layers)) != len(layers) or not all(isinstance(i, int) and 0 <= i < n for i in layers):
        raise BadInput(f"mamba layers {list(layers)} must be distinct layer indices in [0, {n})")
    taken = [i for i in layers if cfg.layer_type(i) != "gqa"]
    if taken:
        raise BadInput(f"layers {taken} are not GQA ({[cfg.layer_type(i) for i in taken]}): Mamba2 is initialised "
                       "from a GQA layer's attention")


@torch.no_grad()
def mamba_from_attention(model: Transformer, layers, conv_init="identity", seed=0, copy=True, gains=None
                         ) -> Transformer:
    """A new Transformer whose GQA layers `layers` are Mamba2 initialised from their attention (the mapping above);
    every other tensor cloned (copy=False: shared with `model`). gains {layer: (d_inner,)}: the norm weights
    (fit_gains); None: ones, as published. Each layer's fresh tensors come from its own seed, so a layer is
    initialised the same whichever other layers are converted with it."""
    cfg = model.config
    layers = [int(i) for i in layers]
    check_mamba_layers(cfg, layers)
    if conv_init not in CONV_INITS:
        raise BadInput(f"conv_init={conv_init!r}: use one of {CONV_INITS}")
    new_cfg = mamba_config(cfg, layers)
    src = model.state_dict()
    d = cfg.dim
    new_sd = {}
    for i in layers:
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        fresh = lambda *shape, bound: (torch.rand(*shape, generator=gen) * 2 - 1) * bound  # nn.Linear / Conv1d's
        p, q = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mamba."
        W_Q, W_K, W_V = (src[p + f"{n}_proj.weight"] for n in "qkv")           # (out, in), HF layout
        dt, dev = W_Q.dtype, W_Q.device
        d_inner, H = new_cfg.ssm_d_inner, new_cfg.ssm_d_inner // new_cfg.ssm_d_state
        conv_dim = d_inner + 2 * new_cfg.ssm_d_xb                              # [x, B, C]
        z = fresh(d_inner, d, bound=d ** -0.5)
        dt_rows = fresh(H, d, bound=d ** -0.5)
        new_sd[q + "in_proj.weight"] = torch.cat([z.to(dev, dt), W_V, W_K, W_Q, dt_rows.to(dev, dt)], dim=0)
        if conv_init == "identity":
            w = torch.zeros(conv_dim, 1, cfg.ssm_d_conv)
            w[..., -1] = 1.0                                                   # the current token, unchanged
            b = torch.zeros(conv_dim)
        else:
            w = fresh(conv_dim, 1, cfg.ssm_d_conv, bound=cfg.ssm_d_conv ** -0.5)
            b = fresh(conv_dim, bound=cfg.ssm_d_conv ** -0.5)
        new_sd[q + "conv1d.weight"], new_sd[q + "conv1d.bias"] = w.to(dev, dt), b.to(dev, dt)
        for name, v in zip(("dt_bias", "A_log", "D"), ssm_init(H, gen)):  # Mamba2's own, fresh
            new_sd[q + name] = v.to(dev, dt)
        new_sd[q + "norm_weight"] = (gains[i] if gains is not None else torch.ones(d_inner)).to(dev, dt)
        new_sd[q + "out_proj.weight"] = src[p + "o_proj.weight"].clone() if copy else src[p + "o_proj.weight"]
    return _assemble(model, layers, new_sd, new_cfg, copy)  # the rest as svd_init assembles an MLA student


@torch.no_grad()
def fit_gains(source: Transformer, layers, calib, conv_init="identity", seed=0, batch_size=4):
    """{layer: (d_inner,) norm weights} for Mamba2 layers initialised from `source`'s attention in `layers`: per
    channel c, the least-squares gain w_c = E[g_c a_c] / E[g_c^2] that brings the layer's normed output g (the
    out_proj input, at weight 1) closest to the attention's output a (the o_proj input), each layer fed the
    source's own input to it on calib (N, T) ids. w = 0 is removing the attention, so the fitted layer is never
    further from the source's (in this per-channel sense) than no layer at all; the published init (w = 1) can be.
    """
    hybrid = mamba_from_attention(source, layers, conv_init, seed, copy=False).eval()
    seen, hooks = {}, []
    for i in layers:
        hooks.append(source.model.layers[i].self_attn.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(("x", i), args[0])))
        hooks.append(source.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(("a", i), args[0])))
        hooks.append(hybrid.model.layers[i].mamba.out_proj.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(("g", i), args[0])))
    num = {i: 0.0 for i in layers}
    den = {i: 0.0 for i in layers}
    try:
        ids = calib.to(source.lm_head.weight.device)
        for j in range(0, len(ids), batch_size):
            source(ids[j:j + batch_size])
            for i in layers:
                hybrid.model.layers[i].mamba(seen[("x", i)])                      # on the source's input
                g, a = seen[("g", i)].flatten(0, 1).double(), seen[("a", i)].flatten(0, 1).double()
                num[i] = num[i] + (g * a).sum(0)
                den[i] = den[i] + (g * g).sum(0)
    finally:
        for h in hooks:
            h.remove()
    return {i: (num[i] / den[i].clamp(min=1e-30)).float().cpu() for i in layers}


# -----------------------------------------------------------------------------
# Which layers stay MLA


def n_mla_for(cfg: ModelConfig, n_mla=None, mla_fraction=None, cache_budget=None, mla_cache=None):
    """The number of MLA layers: n_mla, else the most that fit cache_budget (numbers per token, or a fraction in
    (0, 1] of the source's GQA cache) at mla_cache = r_kv + d_r numbers each, else mla_fraction of the layers."""
    L = cfg.n_layers
    if n_mla is not None and cache_budget is not None:
        raise BadInput(f"give n_mla or cache_budget, not both (got {n_mla} and {cache_budget})")
    if n_mla is None and mla_fraction is None and cache_budget is None:
        raise BadInput("give one of n_mla, mla_fraction and cache_budget")
    if n_mla is not None:
        n = n_mla
    elif cache_budget is None:
        if not 0 < mla_fraction <= 1:
            raise BadInput(f"mla_fraction={mla_fraction} must be in (0, 1]")
        n = max(1, round(L * mla_fraction))
    else:
        numbers = _budget_numbers(cfg, cache_budget)
        n = int(numbers // mla_cache)
        if n < 1:
            raise BadInput(f"cache_budget={cache_budget} ({numbers} numbers per token) does not hold one MLA "
                           f"layer of r_kv + d_r = {mla_cache}. Fix: a larger budget, or smaller kv_rank / "
                           "qk_rope_dim")
    if not (isinstance(n, int) and 0 <= n <= L):
        raise BadInput(f"n_mla={n} must be an integer in [0, {L}]")
    return n


def _budget_numbers(cfg: ModelConfig, cache_budget):
    """cache_budget as numbers per token, read as svd_init reads kv_budget (over the source's whole GQA cache)."""
    try:
        return kv_budget_numbers(cache_budget, cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim)
    except ValueError as e:
        raise BadInput(str(e).replace("kv_budget", "cache_budget").replace("over the converted layers", "")) from None


def check_budget(cfg: ModelConfig, mla_layers, mla_cache, cache_budget):
    """A ValueError if the hybrid's per-token cache (MLA layers only) exceeds cache_budget."""
    if cache_budget is None:
        return
    numbers = _budget_numbers(cfg, cache_budget)
    need = len(mla_layers) * mla_cache  # every other layer becomes Mamba2: no per-token cache
    if need > numbers:
        raise BadInput(f"{len(mla_layers)} MLA layers {sorted(mla_layers)} cache {need} numbers per token, over "
                       f"cache_budget={cache_budget} ({numbers} numbers). Fix: fewer mla_layers, smaller "
                       "ranks, or a larger budget")


def uniform_layers(n_layers, n_mla):
    """The published pattern: every (L / n)-th layer from layer 0."""
    return [i * n_layers // n_mla for i in range(n_mla)]


@torch.no_grad()
def layer_sensitivity(model: Transformer, calib, conv_init="identity", seed=0, batch_size=4, gains=None):
    """{layer: KL(model || model with only that layer as its Mamba2 init)} per token on calib (N, T) ids."""
    ids = calib.to(model.lm_head.weight.device)
    logits_t = calib_logits(model, ids, batch_size=batch_size)
    out = {}
    for i in range(model.config.n_layers):
        if model.config.layer_type(i) != "gqa":
            continue
        one = mamba_from_attention(model, [i], conv_init, seed, copy=False,
                                   gains=None if gains is None else {i: gains[i]}).eval()
        out[i] = calib_kl(logits_t, one, ids, [], batch_size=batch_size)
    return out


def place(sensitivity: dict, n_mla):
    """The n_mla most sensitive layers (ties: the lower index)."""
    return sorted(sorted(sensitivity, key=lambda i: (-sensitivity[i], i))[:n_mla])


# -----------------------------------------------------------------------------
# Intermediate-layer distillation


def ild_errors(outputs: dict, states):
    """outputs {layer i: the student's block i on the teacher's h_i, (B, T, d)}, states the teacher's residual stream
    [h_0 .. h_L], (B, T, d) each -> (B, T): sum_i ||out_i - h_{i+1}||_2 per token, in fp32 at least."""
    err = 0.0
    for i, out in outputs.items():
        f = torch.promote_types(out.dtype, torch.float32)
        err = err + (out.to(f) - states[i + 1].to(f)).norm(dim=-1)
    return err


def converted_layers(student_cfg: ModelConfig, teacher_cfg: ModelConfig):
    """The layers whose mixer differs from the teacher's (what ILD trains), after checking that the two have the same
    residual stream shape."""
    if (student_cfg.n_layers, student_cfg.dim) != (teacher_cfg.n_layers, teacher_cfg.dim):
        raise BadInput(f"ild=True needs the teacher the student was converted from: same layers and width, got "
                       f"student {student_cfg.n_layers} x {student_cfg.dim} vs teacher {teacher_cfg.n_layers} x "
                       f"{teacher_cfg.dim}. Fix: teacher=<the source model>; distil from a larger one afterwards")
    layers = [i for i in range(student_cfg.n_layers) if student_cfg.layer_type(i) != teacher_cfg.layer_type(i)]
    if not layers:
        raise BadInput("ild=True: the student has no layer whose mixer differs from the teacher's")
    return layers


# -----------------------------------------------------------------------------
# Compose a hybrid


def compose(source: Transformer, mla_layers, calib=None, conv_init="identity", seed=0, log=None, gains=None,
            conversion: Conversion | None = None, **settings):
    """The hybrid: `mla_layers` upcycled to MLA by svd_init.upcycle(conversion, **settings), every other GQA layer
    Mamba2 (with `gains` from fit_gains, or ones). No refit of W_UV, W_O unless asked (refit=True): it fits each MLA
    layer to a stream whose other layers are still attention, which the Mamba2 layers then replace (not measured)."""
    mla_layers = sorted(int(i) for i in mla_layers)
    mamba = [i for i in range(source.config.n_layers) if i not in mla_layers and source.config.layer_type(i) == "gqa"]
    model = source
    if mla_layers:
        model = upcycle(source, conversion or Conversion(refit=False), calib=calib, seed=seed, log=log,
                        **{**settings, "mla_layers": mla_layers})
    if not mamba:
        return model
    return mamba_from_attention(model, mamba, conv_init, seed, copy=model is source,
                                gains=None if gains is None else {i: gains[i] for i in mamba})


def cache_table(model: Transformer, source: Transformer, contexts=(1024, 8192, 32768), dtype=torch.bfloat16):
    """Rows of (context, bytes of the hybrid's cache, bytes of the source's) for one sequence."""
    return [(T, model.kv_cache_bytes(1, T, dtype), source.kv_cache_bytes(1, T, dtype)) for T in contexts]


if __name__ == "__main__":
    from configurator import configure
    from data import BUNDLED_SFT, PackedData, build_cache, calibration_ids, check_sources
    # -----------------------------------------------------------------------------
    # settings (a config file, then --key=value)
    init_from = "assets/models/tiny_teacher"  # HF Llama folder or hub id
    out_dir = "out/zebra"      # a new or empty folder, or one written here before
    n_mla: int | None = None
    mla_fraction: float | None = None  # None: a quarter of the layers stay MLA, unless one of the other two is given
    cache_budget: float | None = None  # per-token cache: a fraction of the source's GQA cache, or numbers per token
    placement = "sensitivity"  # "sensitivity" (measured here) or "uniform" (the published pattern)
    conv_init = "identity"     # Mamba2's conv at init: "identity" (ours) or "random" (Mamba2's)
    ssm_gain = "calibrated"    # Mamba2's norm weights at init: "calibrated" (fit_gains, ours) or "ones" (published)
    # MLA layers: svd_init.py's settings (init rorope needs calibration, as does placement="sensitivity"); its
    # mla_layers: explicit MLA layers, else chosen by `placement` from n_mla, mla_fraction or cache_budget
    conversion = Conversion(init="rorope", kv_rank=16, qk_rope_dim=16, refit=False)
    calib_data = list(BUNDLED_SFT)
    calib_tokens = 8192
    calib_seq_len = 256
    data_cache = "out/data_cache"
    tokenizer = ""             # "" = the source folder's own
    device = "cpu"
    dtype = "float32"
    seed = 0
    config = configure(globals())
    # -----------------------------------------------------------------------------
    from configurator import require
    from folders import check_apart
    from svd_init import kl_per_token
    from tokenizer import Tokenizer, check_tokenizer_for
    require(config, calib_tokens=(1, None), calib_seq_len=(1, None), n_mla=(0, None), seed=(0, None))
    chosen = [k for k in ("mla_layers", "n_mla", "mla_fraction") if config[k] is not None]
    if len(chosen) > 1 or (mla_fraction is not None and cache_budget is not None):
        both = chosen + (["cache_budget"] if cache_budget is not None else [])
        raise BadInput(f"{' and '.join(f'{k}={config[k]!r}' for k in both)} each say how many layers stay MLA: "
                       "give one (cache_budget may be given beside mla_layers, as a check)")
    if not chosen and cache_budget is None:
        mla_fraction = 0.25  # the default: a quarter of the layers stay MLA
    folder = resolve_checkpoint(init_from)
    check_apart(out_dir, "out_dir", {"init_from": folder, **{f"calib_data[{i}]": c for i, c in enumerate(calib_data)}},
                {"data_cache": data_cache})
    src_cfg = read_model_config(folder)
    # pre-flight: every setting before the weights are read
    if placement not in PLACEMENTS:
        raise BadInput(f"placement={placement!r}: use one of {PLACEMENTS}")
    if conv_init not in CONV_INITS:
        raise BadInput(f"conv_init={conv_init!r}: use one of {CONV_INITS}")
    if ssm_gain not in GAINS:
        raise BadInput(f"ssm_gain={ssm_gain!r}: use one of {GAINS}")
    mla_layers, kv_rank, qk_rope_dim = conversion.mla_layers, conversion.kv_rank, conversion.qk_rope_dim
    other = [k for k in ("kv_budget", "kv_energy", "head_size", "engine") if getattr(conversion, k)]
    if other:  # the hybrid's cache is sized by the number of MLA layers, each at a fixed r_kv
        raise BadInput(f"{', '.join(other)}: zebra.py's MLA layers take a fixed kv_rank (cache_budget sizes the "
                       "hybrid by how many layers stay MLA; no engine serves a hybrid in the DeepSeek-V3 format). "
                       "Fix: --kv_rank=R and drop " + " and ".join(other))
    d_r = qk_rope_dim if qk_rope_dim is not None else src_cfg.head_dim // 2
    mla_cache = (kv_rank or min(src_cfg.dim, 2 * src_cfg.n_kv_heads * src_cfg.head_dim)) + d_r
    if mla_layers is None:
        n = n_mla_for(src_cfg, n_mla, mla_fraction, cache_budget, mla_cache)
    else:
        if n_mla is not None:
            raise BadInput("give mla_layers or n_mla, not both")
        n = len(mla_layers)
    if not 1 <= calib_seq_len <= src_cfg.max_seq_len:
        raise BadInput(f"calib_seq_len={calib_seq_len} is beyond the model's {src_cfg.max_seq_len} positions "
                       f"(max_position_embeddings). Fix: --calib_seq_len={min(256, src_cfg.max_seq_len)} or less")
    if n:
        conversion = replace(conversion, mla_layers=mla_layers if mla_layers is not None else list(range(n))).checked(
            src_cfg, calib_tokens=calib_tokens, calib_seq_len=calib_seq_len)
    if mla_layers is not None:
        check_mamba_layers(src_cfg, [i for i in range(src_cfg.n_layers) if i not in mla_layers])
    check_budget(src_cfg, mla_layers if mla_layers is not None else list(range(n)), mla_cache, cache_budget)
    check_sources(calib_data)
    check_replaceable(os.path.abspath(out_dir))
    check_not_in_a_live_run(out_dir)
    tok = Tokenizer.from_name(tokenizer, folder)
    check_tokenizer_for(tok, folder, "source")
    calib = calibration_ids(calib_data, tok, data_cache, calib_tokens, calib_seq_len, seed)  # too little data: now
    source = Transformer.from_pretrained(folder, dtype=resolve_dtype(dtype, torch.device(device).type),
                                         device=device).eval()
    t0 = time.time()
    gqa = [i for i in range(src_cfg.n_layers) if src_cfg.layer_type(i) == "gqa"]
    how = "given"
    if mla_layers is None and (placement == "uniform" or n in (0, src_cfg.n_layers)):  # nothing to measure
        mla_layers, how = (uniform_layers(src_cfg.n_layers, n) if n else []), "uniform"
    gains = None
    if ssm_gain == "calibrated":  # the sensitivity measures every layer as Mamba2; else only those that become one
        todo = gqa if mla_layers is None else [i for i in gqa if i not in mla_layers]
        gains = fit_gains(source, todo, calib, conv_init, seed)
        print(f"Mamba2 norm gains fitted on {calib.numel()} calibration tokens for {len(todo)} layers (mean |w| per "
              "layer: " + ", ".join(f"{g.abs().mean():.3f}" for g in gains.values()) + ")")
    if mla_layers is None:
        sens = layer_sensitivity(source, calib[:8], conv_init, seed, gains=gains)
        print("layer sensitivity, KL(source || that layer alone as Mamba2) per token on 8 calibration sequences:")
        print("  " + "  ".join(f"{i}: {v:.3f}" for i, v in sens.items()))
        mla_layers, how = place(sens, n), "sensitivity"
    print(f"MLA layers {mla_layers} ({how}); the other {src_cfg.n_layers - len(mla_layers)} Mamba2")
    hybrid = compose(source, mla_layers, calib, conv_init, seed, log=print, gains=gains, conversion=conversion).eval()
    print(f"composed in {time.time() - t0:.1f} s")
    held = PackedData(build_cache(calib_data, tok, data_cache), "val", calib_seq_len).sample(4 * calib_seq_len, seed)
    kl, _ = kl_per_token(source, hybrid, held)
    print(f"KL(source || hybrid) at init: {kl:.3f} nats/token on {held.numel()} held-out tokens")
    for T, b, s in cache_table(hybrid, source):
        print(f"cache of one sequence at {T:>6} tokens (bf16, state fp32): {b / 2**20:8.3f} MiB vs the source's "
              f"{s / 2**20:8.3f} MiB ({100 * b / s:.2f}%)")
    hybrid.save_pretrained(out_dir, run_config=config, tokenizer=tok)
    print(f"saved {out_dir}; next: python distill.py --student_from={out_dir} --teacher={init_from} --ild=True")
