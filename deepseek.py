"""
The DeepSeek-V3 checkpoint format: an upcycled MLA model written as a folder that transformers, vLLM and SGLang load
as DeepseekV3ForCausalLM with no custom code (the engines then serve it with their MLA kernels and a paged latent
cache), and such folders read back by Transformer.from_pretrained.

    python svd_init.py --init=rorope --kv_budget=0.5 --latent_norm=kv --out_dir=out/s   # a student to export
    python export.py out/s out/s-deepseek                    # export (CPU): export.py, the command of this format
    python export.py out/s out/s-deepseek --check=True       # + transformers' DeepseekV3 on it; its dtype vs fp32
    python export.py out/s out/s-deepseek --dtype=bfloat16   # halve the folder for serving
    vllm serve out/s-deepseek                                # on a GPU machine: README "Serving it"
    python evaluate.py --model=out/s-deepseek ...            # any script reads it back

What every engine builds for this format, so what an exact export must hold (read from transformers 5.24's
modeling_deepseek_v3.py and vLLM's / SGLang's deepseek_v2.py):
    q_proj          (H (d_qk + d_r), d)      when q_lora_rank is null: the query is not factorised, no norm on it
    q_a_proj        (q_lora_rank, d)         otherwise W_DQ, then q_a_layernorm (RMSNorm) and
    q_b_proj        (H (d_qk + d_r), q_lora_rank)                  [W_UQ_h | W_QR_h] per head
    kv_a_proj_with_mqa  (kv_lora_rank + d_r, d)                    [W_DKV ; W_KR]
    kv_a_layernorm  (kv_lora_rank,)          ALWAYS built: an RMSNorm on c_kv, so a model without one has no exact
                                             export (an RMSNorm is not an identity); eps 1e-6 in transformers,
                                             rms_norm_eps in vLLM / SGLang
    kv_b_proj       (H (d_qk + d_v), kv_lora_rank)                 [W_UK_h ; W_UV_h] per head
    o_proj, MLPs (first_k_dense_replace = num_hidden_layers: all dense), norms, lm_head (never tied in the engines)
    RoPE dims in interleaved pairs (2i, 2i+1) at theta^(-2i/d_r) (our layout pairs i with i + d_r/2: permuted
    here), softmax scale (d_qk + d_r)^-1/2, one kv_lora_rank and one q_lora_rank for all layers.

So: per-layer ranks are padded to the largest with zero rows, and the padded width's RMS is compensated exactly
(W_DKV scaled by k = sqrt(R / r), the norm weight by 1 / k: sqrt(ms_R(k c) + eps) = sqrt(ms_r(c) + eps)). A query
without a norm on c_q is exported fused (q_proj = [W_UQ | W_QR] W_DQ). GQA layers, a c_kv without a norm, a latent
norm eps other than 1e-6 and RoPE scalings the format cannot state are refused. What the format does not say (the
source's head_dim, KV heads and tying, each layer's own ranks) goes into config.json under "mla_upcycle", which the
engines ignore and the import reads, so ours -> DeepSeek -> ours gives the same model back.

This file is the format alone (config dicts and tensors, no model); model.py calls it, and its command line is
export.py, which sits above the model it loads.
"""
import math
import warnings

import torch

from errors import BadInput
from folders import rope_of

DS_TYPES = ("deepseek_v3", "deepseek_v2")
# Head sizes (kv_lora_rank + qk_rope_head_dim) that vLLM's MLA code serves (MLACommonBackend: 320, 512, 576; its CPU
# backend, FlashMLA, CUTLASS and FlashInfer-TRTLLM only 576 = 512 + 64). Every served shape has DeepSeek's 64 RoPE
# dims, so a padded export is (head_size - 64) + 64.
ENGINE_HEAD_SIZES = (320, 512, 576)
ENGINE_ROPE_DIM = 64
RECORD = "mla_upcycle"     # config.json key of what an exact round trip needs beyond the format
HF_LATENT_EPS = 1e-6       # transformers' DeepseekV2/V3 latent RMSNorms (built without the config's eps)


def _interleaved(n):
    """Permutation p of n RoPE dims from our rotate-half layout (dim i pairs with i + n/2) to DeepSeek's
    interleaved pairs (2i, 2i + 1): deepseek[j] = ours[p[j]]."""
    h = n // 2
    return torch.stack([torch.arange(h), torch.arange(h) + h], 1).flatten()


# -----------------------------------------------------------------------------
# Export: our MLA model -> DeepSeek-V3 config.json + tensors


def _check_served(head_size, fix):
    if head_size not in ENGINE_HEAD_SIZES:
        raise BadInput(f"head_size={head_size}: vLLM serves kv_lora_rank + qk_rope_head_dim of "
                       f"{', '.join(map(str, ENGINE_HEAD_SIZES))} only; {fix}")


def llama3_unscaled(rot_dim, theta, scaling):
    """How many of the highest frequencies of a rot_dim-dim rotary at theta Llama 3's scaling leaves unchanged:
    those of wavelength below original_max_position_embeddings / high_freq_factor (model.rope_inv_freq). A rotary
    whose frequencies are all among them is the same function with or without the scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))  # as the model's
    short = 2 * math.pi / inv_freq < scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    return int(short.sum())


def engine_shape(cfg, head_size=0):
    """(kv_lora_rank R, qk_rope_head_dim D) of the export: the model's own (largest r_kv, d_r) unpadded, or a served
    head size R + D = head_size with D = 64, or a ValueError with the rule and the nearest shape that is exact."""
    r, d_r = max(cfg.kv_rank), cfg.qk_rope_dim
    if not head_size:
        return r, d_r
    D = ENGINE_ROPE_DIM
    fits = [h for h in ENGINE_HEAD_SIZES if h - D >= r]
    nearest = f"the nearest served shape that holds it is {fits[0]} ({fits[0] - D} + {D})" if fits else \
        f"no served shape holds r_kv {r} (the largest is {ENGINE_HEAD_SIZES[-1] - D} + {D})"
    _check_served(head_size, f"{nearest}. Fix: --head_size={fits[0]}" if fits else nearest)
    if d_r > D or D % d_r:
        raise BadInput(f"d_r {d_r}: a served shape has {D} RoPE dims, and zero padding is exact only when d_r "
                       f"divides {D} (each of our frequencies then sits on the engine's ladder). Fix: upcycle "
                       f"with qk_rope_dim in (16, 32, 64) (svd_init.py / distill.py --head_size={head_size})")
    if r > head_size - D:
        raise BadInput(f"r_kv {r} does not fit head_size {head_size} = {head_size - D} + {D}: padding can only "
                       f"add zeros; {nearest}. Fix: " + (f"--head_size={fits[0]}" if fits else
                                                         f"upcycle at r_kv <= {ENGINE_HEAD_SIZES[-1] - D}"))
    return head_size - D, D


# Each engine's shape rule for kv_lora_rank R + qk_rope_head_dim D, in one place (read from their code: vLLM 0.32-0.34
# MLACommonBackend and its CPU backend; SGLang's Triton MLA decode, which builds V from K and needs
# next_pow2(R + D) = next_pow2(R) unless R + D is 288 or 576). `export.py --engine=NAME` checks an export against it.
ENGINES = {
    "vllm": f"R + D in {ENGINE_HEAD_SIZES} with D = {ENGINE_ROPE_DIM} (FlashMLA, CUTLASS, FlashInfer-TRTLLM: 576 only)",
    "vllm-cpu": f"R + D = 576 with D = {ENGINE_ROPE_DIM}",
    "sglang": "next_pow2(R + D) = next_pow2(R), or R + D in (288, 576) (Triton MLA decode)",
    "llama.cpp": "any R and D",
    "transformers": "any R and D",
}


_np2 = lambda n: 1 << (n - 1).bit_length()
SHAPE_RULES = {  # the engines that restrict the shape (the others in ENGINES serve any R and D)
    "vllm": lambda R, D: R + D in ENGINE_HEAD_SIZES and D == ENGINE_ROPE_DIM,
    "vllm-cpu": lambda R, D: (R, D) == (576 - ENGINE_ROPE_DIM, ENGINE_ROPE_DIM),
    "sglang": lambda R, D: _np2(R + D) == _np2(R) or R + D in (288, 576),
}


def _serves(engine, R, D):
    return SHAPE_RULES[engine](R, D) if engine in SHAPE_RULES else True


def engine_problem(engine, R, D):
    """Why `engine` would refuse a DeepSeek-V3 export of kv_lora_rank R and qk_rope_head_dim D (its rule and the
    nearest shape it serves), or None where it serves it."""
    if engine not in ENGINES:
        raise BadInput(f"engine={engine!r}: use one of {', '.join(ENGINES)}")
    if _serves(engine, R, D):
        return None
    pad = [h for h in ENGINE_HEAD_SIZES if h - ENGINE_ROPE_DIM >= R and ENGINE_ROPE_DIM % D == 0
           and _serves(engine, h - ENGINE_ROPE_DIM, ENGINE_ROPE_DIM)]  # a zero-padded shape it serves
    fix = f"--head_size={pad[0]} (zero-padded to {pad[0] - ENGINE_ROPE_DIM} + {ENGINE_ROPE_DIM}, exact)" if pad else \
        f"re-convert with r_kv <= {ENGINE_HEAD_SIZES[-1] - ENGINE_ROPE_DIM} and d_r dividing {ENGINE_ROPE_DIM}"
    if engine == "sglang":
        fix += f", or re-convert at r_kv {next(r for r in range(R, 4 * R + 2 * D) if _serves(engine, r, D))} + d_r {D}"
    return f"{engine} serves {ENGINES[engine]}; this export is {R} + {D}. Fix: {fix}"


def engine_ranks(src, head_size, mla_layers=None, latent_norm="kv", max_rope_dim=None, **others):
    """(r_kv, d_r) that land a conversion of the GQA config `src` on a served head size exactly, with no padding
    where it can (d_r = 64 needs d_h >= 64; a smaller d_h keeps d_r = d_h, padded at export; max_rope_dim, a Llama 3
    source's unscaled band: the largest d_r dividing 64 within it, padded). `others`: rank settings that would
    contradict it (kv_rank, qk_rope_dim, kv_budget, kv_energy), refused when set."""
    given = [k for k, v in others.items() if v is not None]
    if given:
        raise BadInput(f"head_size={head_size} sets r_kv and d_r itself; {', '.join(given)} would contradict it. "
                       "Fix: drop " + " and ".join(given))
    _check_served(head_size, "Fix: one of those")
    if mla_layers is not None and sorted(mla_layers) != list(range(src.n_layers)):
        raise BadInput("head_size aims at an engine's DeepSeek-V3 format, which has MLA in every layer. Fix: leave "
                       "mla_layers unset")
    if latent_norm == "none":
        raise BadInput("head_size aims at an engine, and every engine builds an RMSNorm on c_kv. Fix: add "
                       "--latent_norm=kv")
    d_r = min(ENGINE_ROPE_DIM, src.head_dim)
    while max_rope_dim is not None and d_r > max_rope_dim and d_r > 2:
        d_r //= 2  # a power of two: it still divides the engine's 64 (exact zero padding)
    if ENGINE_ROPE_DIM % d_r:
        raise BadInput(f"d_h {src.head_dim}: d_r = d_h does not divide the engine's {ENGINE_ROPE_DIM} RoPE dims, "
                       "so no conversion of this model lands on a served shape exactly")
    r_kv, most = head_size - ENGINE_ROPE_DIM, min(src.dim, 2 * src.n_kv_heads * src.head_dim)
    if r_kv > most:
        lower = [h for h in ENGINE_HEAD_SIZES if h - ENGINE_ROPE_DIM <= most]
        raise BadInput(f"head_size={head_size} needs r_kv {r_kv}, beyond this model's rank {most} (min(d, 2 n_kv "
                       "d_h)). Fix: " + (f"--head_size={lower[-1]}" if lower else "no served shape is smaller; "
                                           "export with padding instead (export.py --head_size)"))
    if r_kv + d_r > 2 * src.n_kv_heads * src.head_dim:
        warnings.warn(f"head_size={head_size}: r_kv {r_kv} + d_r {d_r} per layer is more than the source's own cache "
                      f"(2 x {src.n_kv_heads} x {src.head_dim} = {2 * src.n_kv_heads * src.head_dim}): served this way "
                      "the model caches more than before", UserWarning, stacklevel=2)
    return r_kv, d_r


def engine_aim(src, engine, per_layer=None, kv_rank=None, qk_rope_dim=None, head_size=0, mla_layers=None,
               latent_norm="kv", max_rope_dim=None):
    """(r_kv, d_r) of a conversion of the GQA config `src` that `engine` serves as it is (no padding where the
    engine allows): vLLM's head sizes as engine_ranks lands them (head_size, or the largest one within `per_layer`);
    else fixed kv_rank + qk_rope_dim checked against the engine's rule, or the largest r_kv + d_r within `per_layer`
    numbers a token and layer (a kv_budget's share; d_r given, or the d_h / 2^k that fits the most, nearest d_h / 2 on
    a tie). None for an engine that serves any shape. Refused, with the rule and the nearest shape, where none fits."""
    if engine not in ENGINES:
        raise BadInput(f"engine={engine!r}: use one of {', '.join(ENGINES)}")
    if mla_layers is not None and sorted(mla_layers) != list(range(src.n_layers)):
        raise BadInput(f"engine={engine!r} serves the DeepSeek-V3 format, which has MLA in every layer. Fix: leave "
                       "mla_layers unset")
    if latent_norm == "none":
        raise BadInput(f"engine={engine!r}: every engine builds an RMSNorm on c_kv (DeepSeek's kv_a_layernorm). "
                       "Fix: add --latent_norm=kv")
    if engine not in SHAPE_RULES:  # any shape (llama.cpp, transformers)
        return None
    D = ENGINE_ROPE_DIM
    sizes = [h for h in ENGINE_HEAD_SIZES if _serves(engine, h - D, D)]
    if engine.startswith("vllm") or head_size:
        if head_size and head_size not in sizes:
            raise BadInput(f"head_size={head_size}: {engine} serves {ENGINES[engine]}. Fix: --head_size in {sizes}")
        if not head_size and kv_rank is not None:  # a fixed shape (or one aimed already): served as it is or
            if qk_rope_dim is not None and D % qk_rope_dim == 0 and kv_rank + D in sizes:  # zero-padded exactly
                return kv_rank, qk_rope_dim
            raise BadInput(f"r_kv {kv_rank} + d_r {qk_rope_dim}: {engine} serves head sizes {sizes} (r_kv + {D}, d_r "
                           f"dividing {D}, zero-padded at export). Fix: --kv_rank in "
                           f"{[h - D for h in sizes]} with qk_rope_dim in (16, 32, 64), or kv_budget / head_size")
        if not head_size:
            if per_layer is None:
                raise BadInput(f"engine={engine!r} serves head sizes {sizes} (r_kv + d_r with d_r = {D}): give "
                               f"kv_budget (the largest served size within it is taken) or head_size in {sizes}")
            fit = [h for h in sizes if h <= per_layer]
            if not fit:
                raise BadInput(f"the budget gives {per_layer} numbers a token and layer, below {engine}'s smallest "
                               f"head size {sizes[0]} ({ENGINES[engine]}). Fix: a kv_budget of at least "
                               f"{sizes[0]} a layer ({sizes[0] / (2 * src.n_kv_heads * src.head_dim):.3f} of this "
                               "source's cache), or another engine")
            head_size = fit[-1]
        return engine_ranks(src, head_size, None, latent_norm, max_rope_dim, qk_rope_dim=qk_rope_dim)
    most, d_h = min(src.dim, 2 * src.n_kv_heads * src.head_dim), src.head_dim
    if kv_rank is not None:
        if qk_rope_dim is None:
            raise BadInput(f"engine={engine!r} with kv_rank={kv_rank}: its rule ({ENGINES[engine]}) also needs d_r. "
                           "Fix: give qk_rope_dim too, or kv_budget instead of kv_rank")
        if _serves(engine, kv_rank, qk_rope_dim):
            return kv_rank, qk_rope_dim
        lo = next((r for r in range(kv_rank, 0, -1) if _serves(engine, r, qk_rope_dim)), None)
        hi = next((r for r in range(kv_rank, most + 1) if _serves(engine, r, qk_rope_dim)), None)
        near = " or ".join(f"--kv_rank={r}" for r in (lo, hi) if r is not None)
        raise BadInput(f"r_kv {kv_rank} + d_r {qk_rope_dim}: {engine} serves {ENGINES[engine]}. Fix: "
                       + (near or "another qk_rope_dim"))
    if per_layer is None:
        raise BadInput(f"engine={engine!r} serves {ENGINES[engine]}: give kv_budget (the largest such shape within "
                       "it is taken) or kv_rank and qk_rope_dim")
    rope_dims = [qk_rope_dim] if qk_rope_dim is not None else [d_h >> k for k in range(d_h.bit_length())
                                                               if (d_h >> k) % 2 == 0 and d_h >> k >= 2
                                                               and (max_rope_dim is None or d_h >> k <= max_rope_dim)]
    shapes = [(r + D_, -abs(D_ - d_h // 2), r, D_) for D_ in rope_dims
              for r in [next((r for r in range(min(per_layer - D_, most), 0, -1) if _serves(engine, r, D_)), None)]
              if r is not None]
    if not shapes:
        raise BadInput(f"no shape {engine} serves ({ENGINES[engine]}) fits the budget's {per_layer} numbers a token "
                       "and layer" + (f" with d_r {qk_rope_dim}" if qk_rope_dim is not None else "")
                       + ". Fix: a larger kv_budget" + (", or another qk_rope_dim" if qk_rope_dim is not None else ""))
    return max(shapes)[2:]


def cache_line(cfg, head_size=0) -> str:
    """What an engine caches per token for the export, against the GQA source's cache (in numbers per token)."""
    R, D = engine_shape(cfg, head_size)
    L, ours = cfg.n_layers, sum(cfg.kv_rank) + cfg.n_layers * cfg.qk_rope_dim
    gqa = L * 2 * cfg.n_kv_heads * cfg.head_dim
    line = (f"an engine caches (kv_lora_rank {R} + qk_rope_head_dim {D}) x {L} layers = {L * (R + D):,} numbers per "
            f"token ({2 * L * (R + D):,} bytes in bf16): {100 * L * (R + D) / gqa:.1f}% of the GQA source's "
            f"{gqa:,} (2 x {cfg.n_kv_heads} KV heads x {cfg.head_dim} x {L})")
    if L * (R + D) != ours:
        line += (f"; {L * (R + D) - ours:,} of them are zero padding (the model's own latent cache is {ours:,}, "
                 f"{100 * ours / gqa:.1f}%)")
    return line


def export_config(cfg, head_size=0) -> dict:
    """The DeepSeek-V3 config.json for a ModelConfig `cfg`, or a ValueError naming what the format cannot hold.
    head_size (one of ENGINE_HEAD_SIZES): the latent and the RoPE key zero-padded to what vLLM serves, exactly."""
    L = cfg.n_layers
    if cfg.mamba_layers:
        raise BadInput(f"layers {list(cfg.mamba_layers)} are Mamba2: the DeepSeek-V3 format has MLA in every layer, "
                       "and no engine serves this hybrid in it. Fix: save it in this project's format (fmt='llama')")
    gqa = [i for i in range(L) if i not in cfg.mla_layers]
    if gqa:
        raise BadInput(f"layers {gqa} are GQA: the DeepSeek-V3 format has MLA in every layer. Fix: convert all "
                       "layers (svd_init.py / distill.py with mla_layers unset)")
    if cfg.latent_norm == "none":
        raise BadInput("this model has no RMSNorm on c_kv, and every engine builds one (kv_a_layernorm): an RMSNorm "
                       "is not an identity, so the export would compute something else (what makes TransMLA's "
                       "exports emit nonsense in stock engines, fxmeng/TransMLA#24). Fix: upcycle with "
                       "latent_norm=kv (its calibrated init keeps the model close, docs/serving.md) and distil")
    if cfg.latent_norm_eps != HF_LATENT_EPS:
        raise BadInput(f"the latent norms use eps {cfg.latent_norm_eps}; transformers' DeepseekV3 computes them "
                       f"with {HF_LATENT_EPS}. Fix: a model upcycled by this version (latent_norm_eps "
                       f"{HF_LATENT_EPS}), then distil")
    scaling = cfg.rope_scaling
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "llama3" and llama3_unscaled(cfg.qk_rope_dim, cfg.qk_rope_theta or cfg.rope_theta, scaling) == \
            cfg.qk_rope_dim // 2:
        scaling = None  # every frequency the shared key keeps is one Llama 3 leaves alone: the same rotary without it
    elif kind == "llama3":
        n = llama3_unscaled(cfg.head_dim, cfg.rope_theta, scaling)
        fix = (f"convert so that the shared key keeps only frequencies the scaling leaves alone (this source has "
               f"{n}: init='rorope' with rope_ladder='highest', rope_fold=1, qk_rope_dim <= {2 * n}), and the export "
               "writes no rope_scaling; or" if n else "(this source's scaling touches every frequency, so no "
               "conversion avoids it)")
        warnings.warn("Llama 3 RoPE scaling is exact in transformers' DeepseekV3, but vLLM and SGLang turn any "
                      "rope_scaling of a DeepSeek model into DeepSeek-YaRN: served there, long-context positions "
                      f"would rotate differently. Fix for serving: {fix} check the engine's output against ours at "
                      "your context length", UserWarning, stacklevel=3)
    q_fused = cfg.latent_norm != "both"
    R, D = engine_shape(cfg, head_size)
    eos = list(cfg.eos_id)
    hf = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": L, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": None if q_fused else max(cfg.q_rank), "kv_lora_rank": R,
        "qk_nope_head_dim": cfg.qk_nope_dim, "qk_rope_head_dim": D, "v_head_dim": cfg.v_head_dim,
        "rope_theta": cfg.qk_rope_theta or cfg.rope_theta, "rope_scaling": scaling, "rope_interleave": True,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
        # dense MLPs in every layer. The expert fields stay small integers: engines do arithmetic on them (and
        # llama.cpp asserts n_group < n_routed_experts, so 2 experts, never built)
        "first_k_dense_replace": L, "moe_layer_freq": 1, "n_routed_experts": 2, "n_shared_experts": 1,
        "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1, "moe_intermediate_size": cfg.intermediate_size,
        "routed_scaling_factor": 1.0, "norm_topk_prob": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "num_nextn_predict_layers": 0, "initializer_range": 0.02, "use_cache": True,
        RECORD: {"version": 1, "q_rank": list(cfg.q_rank), "kv_rank": list(cfg.kv_rank), "q_fused": q_fused,
                 "latent_norm": cfg.latent_norm, "tie_embeddings": cfg.tie_embeddings, "head_dim": cfg.head_dim,
                 "n_kv_heads": cfg.n_kv_heads, "rope_theta": cfg.rope_theta, "qk_rope_theta": cfg.qk_rope_theta,
                 "qk_rope_dim": cfg.qk_rope_dim, "q_scale": _q_scale(cfg.qk_nope_dim, cfg.qk_rope_dim, D)},
    }
    if scaling is None:
        del hf["rope_scaling"]
    return hf


@torch.no_grad()
def export_tensors(cfg, sd, head_size=0) -> dict:
    """Our state dict `sd` (HF Llama names, MLA layers W_DQ ... W_UV) -> DeepSeek-V3 tensors, in sd's dtype."""
    H, d_qk, d_r, d_v = cfg.n_heads, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim
    R_kv, D = engine_shape(cfg, head_size)
    R_q, q_fused = max(cfg.q_rank), cfg.latent_norm != "both"
    c = _q_scale(d_qk, d_r, D)  # the engine's softmax scale is (d_qk + D)^-1/2: the query makes up the difference
    rope = lambda t, dim: _rope_rows(t, d_r, D, dim)
    if sd["lm_head.weight"].element_size() < 4 and _rescales(cfg, head_size):
        # sqrt(R / r) and the query's factor rounded into 16-bit weights would move the model by a bf16 rounding of
        # every latent row: the folder is float32 instead, so it is exact; an engine rounds once, to its own dtype
        warnings.warn("the export rescales weights (padded ranks or RoPE dims): written in float32 so that it stays "
                      "exact; serve it with the engine's --dtype bfloat16 as usual", UserWarning, stacklevel=3)
        sd = {k: v.float() for k, v in sd.items()}
    out = {k: v for k, v in sd.items() if ".self_attn." not in k}
    head = sd["lm_head.weight"]
    out["lm_head.weight"] = head.clone() if cfg.tie_embeddings else head  # tied here or not: engines read their own
    for j, i in enumerate(cfg.mla_layers):
        p = f"model.layers.{i}.self_attn."
        w = lambda n: sd[p + n + ".weight"]
        dt = w("W_DKV").dtype
        r_q, r_kv = cfg.q_rank[j], cfg.kv_rank[j]
        q_up = torch.cat([w("W_UQ").view(H, d_qk, r_q), rope(w("W_QR").view(H, d_r, r_q), 1)], 1)
        q_up = q_up.reshape(H * (d_qk + D), r_q)                                  # rows per head [nope | rope]
        if q_fused:  # no norm between W_DQ and W_UQ: one matrix, rounded once from float64
            out[p + "q_proj.weight"] = (q_up.double() @ w("W_DQ").double() * c).to(dt)
        else:
            k = math.sqrt(R_q / r_q)
            out[p + "q_a_proj.weight"] = _pad_rows(_scaled(w("W_DQ"), k), R_q)
            out[p + "q_a_layernorm.weight"] = _pad_rows(_scaled(w("q_norm"), 1 / k), R_q)
            out[p + "q_b_proj.weight"] = _pad_cols(_scaled(q_up, c), R_q)
        k = math.sqrt(R_kv / r_kv)
        out[p + "kv_a_proj_with_mqa.weight"] = torch.cat([_pad_rows(_scaled(w("W_DKV"), k), R_kv), rope(w("W_KR"), 0)])
        out[p + "kv_a_layernorm.weight"] = _pad_rows(_scaled(w("kv_norm"), 1 / k), R_kv)
        kv_b = torch.cat([w("W_UK").view(H, d_qk, r_kv), w("W_UV").view(H, d_v, r_kv)], 1)
        out[p + "kv_b_proj.weight"] = _pad_cols(kv_b.reshape(H * (d_qk + d_v), r_kv), R_kv)
        out[p + "o_proj.weight"] = w("o_proj")
    return {k: v.contiguous() for k, v in out.items()}


def _rescales(cfg, head_size):
    """Whether the export multiplies weights by factors other than 1 (then 16-bit weights would round)."""
    R, D = engine_shape(cfg, head_size)
    return D != cfg.qk_rope_dim or any(r != R for r in cfg.kv_rank) or (
        cfg.latent_norm == "both" and len(set(cfg.q_rank)) > 1)


def _q_scale(d_qk, d_r, D):
    """The factor on the query that keeps q.k (d_qk + d_r)^-1/2 when the engine scales by (d_qk + D)^-1/2."""
    return math.sqrt((d_qk + D) / (d_qk + d_r))


def _rope_positions(d_r, D):
    """Where our d_r RoPE dims go among the engine's D interleaved ones: our pair i (frequency theta^(-2i/d_r))
    onto the engine's pair i D/d_r, whose frequency theta^(-2 (i D/d_r) / D) is the same (the same float, too: both
    exponents are exact binary fractions). deepseek[pos[j]] = ours[_interleaved(d_r)[j]]."""
    s, i = D // d_r, torch.arange(d_r // 2)
    return torch.stack([2 * s * i, 2 * s * i + 1], 1).flatten()


def _rope_rows(t, d_r, D, dim):
    """Our rotate-half RoPE rows (d_r along dim) -> the engine's D interleaved rows, zeros where no frequency of ours
    sits (D == d_r: only the permutation)."""
    shape = list(t.shape)
    shape[dim] = D
    return t.new_zeros(shape).index_copy_(dim, _rope_positions(d_r, D), t.index_select(dim, _interleaved(d_r)))


def _scaled(t, k):  # k == 1 (an unpadded layer) leaves the tensor bit for bit as it was
    return t if k == 1 else (t.double() * k).to(t.dtype)


def _pad_rows(t, n):
    return t if t.shape[0] == n else torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])


def _pad_cols(t, n):
    return t if t.shape[1] == n else torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1])], 1)


# -----------------------------------------------------------------------------
# Import: a DeepSeek-V2/V3-format folder with dense MLPs -> our config.json fields and tensors


class Reader:
    """Reads a DeepSeek-format config.json (ours, TransMLA's --deepseek-style exports, DeepSeek-V2-Lite-shaped
    attention with dense MLPs). `.config` is the equivalent config.json in this project's own form (llama_mla);
    `.tensors(name, t)` maps one checkpoint tensor to ours; `.generated(dtype, device)` makes what the checkpoint
    does not hold (W_DQ = I for a query without factorisation)."""

    def __init__(self, hf: dict):
        self.hf = hf
        mt = hf.get("model_type")
        L, H, d = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
        bad = []
        if hf.get("attention_bias"):
            bad.append("attention_bias (biases on the projections)")
        if hf.get("use_qk_head_norm"):
            bad.append("use_qk_head_norm (per-head q/k norms)")
        if hf.get("hidden_act", "silu") != "silu":
            bad.append(f"hidden_act {hf['hidden_act']!r}")
        freq = hf.get("moe_layer_freq", 1) or 1
        if hf.get("n_routed_experts") and any(i >= hf.get("first_k_dense_replace", 0) and i % freq == 0
                                              for i in range(L)):
            bad.append(f"MoE layers (n_routed_experts {hf['n_routed_experts']}, first_k_dense_replace "
                       f"{hf.get('first_k_dense_replace', 0)} < {L} layers)")
        theta, scaling = rope_of(hf)
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind not in ("default", "llama3"):
            bad.append(f"rope_scaling {kind!r} (model.py's rotary has none or Llama 3's; DeepSeek's YaRN is not "
                       "implemented here)")
        if bad:
            raise BadInput(f"a {mt} checkpoint with " + "; ".join(bad) + ": this project's model cannot compute "
                           "it. It reads DeepSeek-format folders with dense SiLU MLPs and plain MLA attention")
        rec = hf.get(RECORD) or {}
        self.q_fused = hf.get("q_lora_rank") is None
        self.R_q = d if self.q_fused else hf["q_lora_rank"]
        self.R_kv = hf["kv_lora_rank"]
        self.normed = hf.get("qk_latent_layernorm", True)  # TransMLA writes False when it built no latent norms
        self.latent_norm = "none" if not self.normed else ("kv" if self.q_fused else "both")
        self.q_rank = [self.R_q] * L if self.q_fused or "q_rank" not in rec else list(rec["q_rank"])
        self.kv_rank = list(rec.get("kv_rank", [self.R_kv] * L))
        self.interleaved = mt == "deepseek_v2" or hf.get("rope_interleave", True)  # V2 is always interleaved
        self.H, self.L = H, L
        self.d_qk, self.D, self.d_v = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
        self.d_r = rec.get("qk_rope_dim", self.D)   # < D: an engine-shaped export, RoPE dims zero-padded
        self.q_scale = rec.get("q_scale", 1.0)      # the query's factor for the engine's softmax scale
        self.tied = rec.get("tie_embeddings", hf.get("tie_word_embeddings", False))
        self.config = {
            "model_type": "llama_mla", "vocab_size": hf["vocab_size"], "hidden_size": d,
            "intermediate_size": hf["intermediate_size"], "num_hidden_layers": L, "num_attention_heads": H,
            "num_key_value_heads": rec.get("n_kv_heads", H), "head_dim": rec.get("head_dim", self.d_v),
            "rms_norm_eps": hf.get("rms_norm_eps", 1e-6), "rope_theta": rec.get("rope_theta", theta),
            "qk_rope_theta": rec.get("qk_rope_theta", 0.0), "rope_scaling": scaling,
            "max_position_embeddings": hf.get("max_position_embeddings", 2048), "tie_word_embeddings": self.tied,
            "bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id"),
            "mla_layers": list(range(L)), "mla_q_rank": self.q_rank, "mla_kv_rank": self.kv_rank,
            "qk_nope_head_dim": self.d_qk, "qk_rope_head_dim": self.d_r, "v_head_dim": self.d_v,
            "mla_latent_norm": self.latent_norm, "mla_latent_norm_eps": HF_LATENT_EPS,
        }
        # our layout from theirs: the rows the export filled, in the inverse of its permutation (rotate-half: as is)
        self._take = (_rope_positions(self.d_r, self.D)[torch.argsort(_interleaved(self.d_r))] if self.interleaved
                      else torch.arange(self.d_r))

    def skip(self, name):
        """Tensors with no counterpart: derived rotary buffers, multi-token-prediction layers (index >= L)."""
        if name.endswith("rotary_emb.inv_freq"):
            return True
        parts = name.split(".")
        return len(parts) > 2 and parts[1] == "layers" and self._layer(name) >= self.L

    @staticmethod
    def _layer(name):
        """The layer index of model.layers.<i>.…: an odd name is refused by name."""
        i = name.split(".")[2] if name.count(".") >= 2 else ""
        if not i.isdigit():
            raise BadInput(f"{name}: not a tensor name of a DeepSeek checkpoint (model.layers.<index>.…). Fix: "
                           "rename it back, or copy the weights again from where the model came from")
        return int(i)

    def tensors(self, name, t):
        """One DeepSeek tensor -> [(our name, tensor), ...]."""
        if ".mlp.experts." in name or ".mlp.gate." in name or ".shared_experts." in name:
            raise BadInput(f"{name}: MoE weights; this project's model has dense MLPs only")
        if ".self_attn." not in name:
            return [(name, t)]
        p, leaf = name.rsplit(".self_attn.", 1)
        i, p = self._layer(name), p + ".self_attn."
        H, d_qk, d_r, d_v = self.H, self.d_qk, self.d_r, self.d_v
        r_q, r_kv = self.q_rank[i], self.kv_rank[i]
        k_q, k_kv = math.sqrt(self.R_q / r_q), math.sqrt(self.R_kv / r_kv)
        if leaf == "q_proj.weight" or leaf == "q_b_proj.weight":
            q = _scaled(self._unpad(name, t.view(H, d_qk + self.D, -1), r_q, dim=2), 1 / self.q_scale)
            return [(p + "W_UQ.weight", q[:, :d_qk].reshape(H * d_qk, -1)),
                    (p + "W_QR.weight", self._rope(name, q[:, d_qk:], 1).reshape(H * d_r, -1))]
        if leaf == "q_a_proj.weight":
            return [(p + "W_DQ.weight", _scaled(self._unpad(name, t, r_q, dim=0), 1 / k_q))]
        if leaf == "q_a_layernorm.weight":
            return [(p + "q_norm.weight", _scaled(self._unpad(name, t, r_q, dim=0), k_q))]
        if leaf == "kv_a_proj_with_mqa.weight":
            c, rope = t[:self.R_kv], t[self.R_kv:]
            return [(p + "W_DKV.weight", _scaled(self._unpad(name, c, r_kv, dim=0), 1 / k_kv)),
                    (p + "W_KR.weight", self._rope(name, rope, 0))]
        if leaf == "kv_a_layernorm.weight":
            return [(p + "kv_norm.weight", _scaled(self._unpad(name, t, r_kv, dim=0), k_kv))]
        if leaf == "kv_b_proj.weight":
            kv = self._unpad(name, t.view(H, d_qk + d_v, -1), r_kv, dim=2)
            return [(p + "W_UK.weight", kv[:, :d_qk].reshape(H * d_qk, -1)),
                    (p + "W_UV.weight", kv[:, d_qk:].reshape(H * d_v, -1))]
        if leaf == "o_proj.weight":
            return [(name, t)]
        raise BadInput(f"{name}: not a tensor of DeepSeek's MLA attention (q_proj, q_a_proj, q_a_layernorm, "
                       "q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj). Fix: rename it back, "
                       "or copy the weights again from where the model came from")

    def _rope(self, name, t, dim):
        """Our d_r RoPE rows of the D the checkpoint holds; the others were an engine shape's padding: zero."""
        if self.D != self.d_r and t.index_fill(dim, self._take, 0).count_nonzero():
            raise BadInput(f"{name}: the RoPE rows beyond the model's d_r {self.d_r} (config.json {RECORD}) are "
                           f"not zero: the folder was changed after export. Fix: delete {RECORD}.qk_rope_dim and "
                           "q_scale from its config.json to read it at the padded width")
        return t.index_select(dim, self._take)

    @staticmethod
    def _unpad(name, t, r, dim):
        """The first r entries along dim; the rest was padding (an export's per-layer rank) and must be zero."""
        n = t.shape[dim]
        if r == n:
            return t
        if t.narrow(dim, r, n - r).count_nonzero():
            raise BadInput(f"{name}: the padding beyond this layer's rank {r} (config.json {RECORD}) is not zero: "
                           f"the folder was changed after export. Fix: delete {RECORD} from its config.json to read "
                           "it at the padded width")
        return t.narrow(dim, 0, r)

    def generated(self, dtype, device):
        """Tensors the format does not hold: a query without factorisation is W_DQ = I (r_q = d) here."""
        if not self.q_fused:
            return {}
        eye = torch.eye(self.R_q, dtype=dtype, device=device)
        return {f"model.layers.{i}.self_attn.W_DQ.weight": eye for i in range(self.L)}


# -----------------------------------------------------------------------------
# The command line


@torch.no_grad()
def compare_with_transformers(model, folder, n_tokens=64, device="cpu"):
    """Max |logits(transformers DeepseekV3ForCausalLM on folder) - logits(model)| in float32 on random ids, both on
    `device`; and the largest |logit|, to scale a tolerance by."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, min(n_tokens, model.config.max_seq_len)),
                        generator=torch.Generator().manual_seed(0)).to(device)
    ours = model.float().to(device)(ids)
    return (ref(ids).logits - ours).abs().max().item(), ours.abs().max().item()


if __name__ == "__main__":  # the command moved above the model it loads (this file is below model.py)
    raise SystemExit("the export command is export.py: python export.py MODEL_DIR OUT_DIR [--dtype=bfloat16] "
                     "[--check=True] [--head_size=576]")
