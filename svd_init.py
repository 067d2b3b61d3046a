"""
Upcycle a pre-trained Llama's GQA attention into MLA by SVD (X-EcoMLA, arXiv 2503.11132, §4.1, Algorithm 1).

    python svd_init.py                                             # bundled stories260K, CPU, seconds
    python svd_init.py config/llama1b_kv64.py --init_from=meta-llama/Llama-3.2-1B-Instruct --out_dir=out/kv64
    python svd_init.py config/llama1b_kv64.py --init_from=DIR --device=cuda      # SVDs on the GPU
    python svd_init.py --run_sweep=True  # KL(teacher||student) at init on stories260K: ranks, svd vs random, dynamic
    python svd_init.py --run_bench=True  # time + peak memory of converting a random Llama-3.2-1B-shaped model

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
import os
import resource
import sys
import time

import torch

from model import ModelConfig, Transformer, check_replaceable, read_model_config, resolve_checkpoint, resolve_dtype


# -----------------------------------------------------------------------------
# The factorisation


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


def _check_settings(cfg: ModelConfig, layers, q_rank, kv_rank, q_energy, kv_energy, d_qk, d_r, init,
                    allow_qk_overlap):
    n = cfg.n_layers
    if not layers or len(set(layers)) != len(layers) or not all(isinstance(i, int) and 0 <= i < n for i in layers):
        raise ValueError(f"mla_layers={layers} must be distinct layer indices in [0, {n})")
    already = [i for i in layers if i in cfg.mla_layers]
    if already:
        raise ValueError(f"layers {already} are already MLA; upcycle converts GQA layers only")
    if cfg.v_head_dim != cfg.head_dim:
        raise ValueError(f"d_v must equal d_h (paper §4.1), got v_head_dim={cfg.v_head_dim}, head_dim={cfg.head_dim}")
    if cfg.mla_layers and (d_qk, d_r) != (cfg.qk_nope_dim, cfg.qk_rope_dim):
        raise ValueError(f"the source already has MLA layers with d_qk={cfg.qk_nope_dim}, d_r={cfg.qk_rope_dim}; "
                         f"new layers must use the same (got {d_qk}, {d_r})")
    d_h = cfg.head_dim
    if not (1 <= d_qk <= d_h and 2 <= d_r <= d_h and d_r % 2 == 0):
        raise ValueError(f"need 1 <= d_qk <= d_h and an even 2 <= d_r <= d_h (d_h={d_h}); got d_qk={d_qk}, d_r={d_r}")
    if d_qk + d_r > d_h and not allow_qk_overlap:
        raise ValueError(f"d_qk + d_r = {d_qk + d_r} > d_h = {d_h}: the no-RoPE and RoPE slices of each head would "
                         "overlap. Lower them, or set allow_qk_overlap=True (the paper's d_qk = d_r = d_h rows do this)")
    if init not in ("svd", "random"):
        raise ValueError(f"init={init!r}: use 'svd' or 'random'")
    max_q, max_kv = min(cfg.dim, cfg.n_heads * d_h), min(cfg.dim, 2 * cfg.n_kv_heads * d_h)
    for name, rank, energy, hi in (("q", q_rank, q_energy, max_q), ("kv", kv_rank, kv_energy, max_kv)):
        if (rank is None) == (energy is None):
            raise ValueError(f"give exactly one of {name}_rank (fixed) and {name}_energy (dynamic); "
                             f"got {name}_rank={rank}, {name}_energy={energy}")
        if rank is not None and not (isinstance(rank, int) and 1 <= rank <= hi):
            why = " (the joint [W_K, W_V] of a GQA model has rank at most min(d, 2 n_kv d_h))" if name == "kv" else ""
            raise ValueError(f"{name}_rank={rank} must be an integer in [1, {hi}]{why}")
        if energy is not None and not (0 < energy <= 1):
            raise ValueError(f"{name}_energy={energy} must be in (0, 1]")


def check_settings(cfg: ModelConfig, mla_layers=None, q_rank=None, kv_rank=None, q_energy=None, kv_energy=None,
                   qk_nope_dim=None, qk_rope_dim=None, init="svd", allow_qk_overlap=False, **_):
    """upcycle()'s settings checked against a source config alone (no weights needed): scripts call it before any
    work, so a bad rank fails in a second, not after the data is tokenised."""
    layers = list(range(cfg.n_layers)) if mla_layers is None else mla_layers
    if not isinstance(layers, (list, tuple)):
        raise ValueError(f"mla_layers={layers!r} must be a list of layer indices, e.g. [{layers!r}]")
    d_qk = cfg.head_dim // 2 if qk_nope_dim is None else qk_nope_dim
    d_r = cfg.head_dim // 2 if qk_rope_dim is None else qk_rope_dim
    _check_settings(cfg, list(layers), q_rank, kv_rank, q_energy, kv_energy, d_qk, d_r, init, allow_qk_overlap)


def mla_config(cfg: ModelConfig, ranks: dict, d_qk, d_r, latent_norm=False) -> ModelConfig:
    """The config of the upcycled model: `cfg` with layers {layer: (r_q, r_kv)} made MLA (added to the source's own
    MLA layers, if any, which keep their ranks). Each layer keeps its own ranks: nothing is shared between layers."""
    if cfg.mla_layers and latent_norm != cfg.latent_norm:
        raise ValueError(f"the source's MLA layers have latent_norm={cfg.latent_norm}; new layers must match")
    ranks = dict(ranks)
    for j, i in enumerate(cfg.mla_layers):
        ranks[i] = (cfg.q_rank[j], cfg.kv_rank[j])
    order = sorted(ranks)
    return ModelConfig(**{**vars(cfg), "mla_layers": tuple(order), "q_rank": tuple(ranks[i][0] for i in order),
                          "kv_rank": tuple(ranks[i][1] for i in order), "qk_nope_dim": d_qk, "qk_rope_dim": d_r,
                          "latent_norm": latent_norm})


@torch.no_grad()
def upcycle(model: Transformer, mla_layers=None, q_rank=None, kv_rank=None, q_energy=None, kv_energy=None,
            qk_nope_dim=None, qk_rope_dim=None, init="svd", latent_norm=False, allow_qk_overlap=False, seed=0,
            report=None, copy=True) -> Transformer:
    """A new Transformer whose layers `mla_layers` (default all) are MLA initialised from `model`'s attention;
    every other tensor is cloned (training the result never touches `model`), or with copy=False shared with
    `model` (for convert-and-save: no second copy of the weights in memory; train neither while they share).
    Fixed ranks (q_rank, kv_rank) or dynamic ones (q_energy, kv_energy: delta in (0, 1]); d_qk, d_r default to
    d_h / 2 each. If `report` is a list, one dict per converted layer is appended (ranks, energy kept, parameters,
    cache per token)."""
    cfg = model.config
    layers = list(range(cfg.n_layers)) if mla_layers is None else [int(i) for i in mla_layers]
    d_h, H, n_kv, d = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.dim
    d_qk = d_h // 2 if qk_nope_dim is None else qk_nope_dim
    d_r = d_h // 2 if qk_rope_dim is None else qk_rope_dim
    _check_settings(cfg, layers, q_rank, kv_rank, q_energy, kv_energy, d_qk, d_r, init, allow_qk_overlap)
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
        if latent_norm:
            new_sd[p + "q_norm.weight"] = torch.ones(r_q, dtype=out_dtype, device=W_Q.device)
            new_sd[p + "kv_norm.weight"] = torch.ones(r_kv, dtype=out_dtype, device=W_Q.device)
        if report is not None:
            n_attn = sum(v.numel() for k, v in new_sd.items() if k.startswith(p))
            report.append(dict(layer=i, r_q=r_q, r_kv=r_kv, q_energy=energy_kept(S_q, r_q),
                               kv_energy=energy_kept(S_kv, r_kv), params=n_attn,
                               src_params=sum(src[p + f"{x}_proj.weight"].numel() for x in "qkvo"),
                               cache=r_kv + d_r, src_cache=2 * n_kv * d_h))
    new_cfg = mla_config(cfg, ranks, d_qk, d_r, latent_norm)
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
    return student.train(model.training)


# -----------------------------------------------------------------------------
# Measuring an initialisation: KL(teacher || student) per token on text the teacher writes


@torch.no_grad()
def teacher_text(teacher, n_seq, seq_len, seed=0, temperature=1.0):
    """Held-out text sampled from the teacher itself (from BOS): the distribution the student should match."""
    torch.manual_seed(seed)
    start = torch.full((n_seq, 1), teacher.config.bos_id, dtype=torch.long, device=teacher.lm_head.weight.device)
    return teacher.generate(start, seq_len - 1, temperature=temperature)


@torch.no_grad()
def kl_per_token(teacher, student, idx):
    """Mean over tokens of KL(p_teacher || p_student) in nats, and the teacher's mean entropy."""
    lp_t = teacher(idx).float().log_softmax(-1)
    lp_s = student(idx).float().log_softmax(-1)
    p_t = lp_t.exp()
    kl = (p_t * (lp_t - lp_s)).sum(-1).mean().item()
    ent = -(p_t * lp_t).sum(-1).mean().item()
    return kl, ent


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


# -----------------------------------------------------------------------------
# The stories260K sweep (README table) and the Llama-3.2-1B-shaped benchmark


def sweep(teacher, n_seq, seq_len, seed, n_random=5):
    """KL at init for fixed ranks (svd vs random, random as mean +- std over n_random draws) and dynamic ranks."""
    idx = teacher_text(teacher, n_seq, seq_len, seed)
    cfg = teacher.config
    full_q, full_kv = min(cfg.dim, cfg.n_heads * cfg.head_dim), min(cfg.dim, 2 * cfg.n_kv_heads * cfg.head_dim)
    _, ent = kl_per_token(teacher, teacher, idx)
    print(f"held-out: {n_seq} x {seq_len} tokens sampled from the teacher (T=1, seed {seed}); "
          f"teacher entropy {ent:.3f} nats/token; d_qk = d_r = {cfg.head_dim // 2}")
    print("| ranks | mean r_q | mean r_kv | KV cache % | KL svd init | KL random init "
          f"(mean ± std of {n_random}) |")
    print("|---|---|---|---|---|---|")
    settings = [(f"fixed r_q={full_q} r_kv={r}", dict(q_rank=full_q, kv_rank=r))
                for r in (full_kv, full_kv // 2, full_kv // 4, full_kv // 8)]
    settings += [(f"dynamic δ_q=δ_kv={d}", dict(q_energy=d, kv_energy=d)) for d in (0.99, 0.95, 0.9, 0.8)]
    for name, kw in settings:
        rep = []
        student = upcycle(teacher, report=rep, **kw).eval()
        kl, _ = kl_per_token(teacher, student, idx)
        rnd = torch.tensor([kl_per_token(teacher, upcycle(teacher, init="random", seed=k, **kw).eval(), idx)[0]
                            for k in range(n_random)])
        mean = lambda k: sum(r[k] for r in rep) / len(rep)
        pct = 100 * student.kv_cache_elements_per_token() / teacher.kv_cache_elements_per_token()
        print(f"| {name} | {mean('r_q'):.1f} | {mean('r_kv'):.1f} | {pct:.1f}% | {kl:.3f} | "
              f"{rnd.mean():.3f} ± {rnd.std():.3f} |")


def bench(device, q_rank, kv_rank, qk_nope_dim, qk_rope_dim):
    """Convert a random Llama-3.2-1B-shaped model; print wall time and peak memory."""
    cfg = ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                      intermediate_size=8192, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                      rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192))
    with torch.device("meta"):
        src = Transformer(cfg)
    src.to_empty(device=device)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.02)
    src._init_rope(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    student = upcycle(src, q_rank=q_rank, kv_rank=kv_rank, qk_nope_dim=qk_nope_dim, qk_rope_dim=qk_rope_dim,
                      copy=False)  # as the command line converts: no second copy of the untouched weights
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n = sum(p.numel() for p in student.parameters())
    print(f"converted a random Llama-3.2-1B-shaped model (16 layers, r_q {q_rank}, r_kv {kv_rank}, "
          f"d_qk {qk_nope_dim}, d_r {qk_rope_dim}) on {device} with {torch.get_num_threads()} threads: "
          f"{dt:.1f} s; process peak RSS {rss1:.2f} GiB (source model alone: {rss0:.2f} GiB); {n:,} parameters")
    if device.startswith("cuda"):
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    from configurator import configure
    # -----------------------------------------------------------------------------
    # settings (a config file, then --key=value)
    init_from = "tests/fixtures/stories260K"   # HF Llama folder or hub id
    out_dir = "out/svd_init"   # a new or empty folder, or one svd_init wrote before (anything else is refused)
    tokenizer = ""             # recorded in out_dir: "" = the source folder's own; or "bytes", "llama3", a folder
    mla_layers: list | None = None  # None: all layers; a list of indices makes a hybrid
    q_rank: int | None = None  # fixed r_q ...
    kv_rank: int | None = None  # ... and r_kv, or dynamic:
    q_energy: float | None = None  # delta_q in (0, 1]
    kv_energy: float | None = None  # delta_kv in (0, 1]
    qk_nope_dim: int | None = None  # d_qk (None: d_h / 2)
    qk_rope_dim: int | None = None  # d_r (None: d_h / 2)
    init = "svd"               # "svd" or "random" (the paper's baseline)
    latent_norm = False
    allow_qk_overlap = False
    device = "cpu"
    dtype = "float32"          # the dtype the model is loaded and saved in (the SVD itself is always float32)
    seed = 0
    sweep_seqs = 16            # --run_sweep: held-out sequences sampled from the teacher ...
    sweep_len = 256            # ... and their length
    run_sweep = False          # print the stories260K KL-at-init table
    run_bench = False          # time a random Llama-3.2-1B-shaped conversion
    config = configure(globals())
    # -----------------------------------------------------------------------------
    if run_bench:
        bench(device, q_rank or 1424, kv_rank or 64, qk_nope_dim or 32, qk_rope_dim or 32)
        sys.exit(0)
    folder = resolve_checkpoint(init_from)
    if not run_sweep:  # pre-flight: settings, output folder and tokenizer, before the weights are read
        src_cfg = read_model_config(folder)
        check_settings(src_cfg, mla_layers, q_rank if q_rank is not None or q_energy is not None else 1,
                       kv_rank if kv_rank is not None or kv_energy is not None else 1, q_energy, kv_energy,
                       qk_nope_dim, qk_rope_dim, init, allow_qk_overlap)
        check_replaceable(os.path.abspath(out_dir))
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
    teacher = Transformer.from_pretrained(folder, dtype=resolve_dtype(dtype, torch.device(device).type),
                                          device=device).eval()
    if run_sweep:
        sweep(teacher, sweep_seqs, sweep_len, seed)
        sys.exit(0)
    if q_rank is None and q_energy is None:   # nothing chosen: keep the full rank
        q_rank = min(teacher.config.dim, teacher.config.n_heads * teacher.config.head_dim)
    if kv_rank is None and kv_energy is None:
        kv_rank = min(teacher.config.dim, 2 * teacher.config.n_kv_heads * teacher.config.head_dim)
    report = []
    t0 = time.time()
    student = upcycle(teacher, mla_layers=mla_layers, q_rank=q_rank, kv_rank=kv_rank, q_energy=q_energy,
                      kv_energy=kv_energy, qk_nope_dim=qk_nope_dim, qk_rope_dim=qk_rope_dim, init=init,
                      latent_norm=latent_norm, allow_qk_overlap=allow_qk_overlap, seed=seed, report=report,
                      copy=False).eval()  # the teacher's untouched tensors are shared, not duplicated
    print(f"upcycled {init_from} in {time.time() - t0:.1f} s ({init} init)")
    print_table(report, teacher.config, student)
    if teacher.config.vocab_size <= 1024 and teacher.config.bos_id is not None:  # tiny model: measure it right away
        idx = teacher_text(teacher, 8, 128, seed)
        kl, ent = kl_per_token(teacher, student, idx)
        print(f"KL(teacher||student) at init: {kl:.3f} nats/token on 8 x 128 teacher-sampled tokens "
              f"(teacher entropy {ent:.3f})")
    table = os.path.join(folder, "tokenizer_tok512.json")  # llama2.c's decode table: python model.py reads it
    student.save_pretrained(out_dir, run_config=config, tokenizer=tok,
                            extra_files=[table] if tok is None and os.path.exists(table) else ())
    print(f"saved {out_dir} (config.json, safetensors, run_config.json, the tokenizer); "
          f"sample from it with: python model.py {out_dir}")
