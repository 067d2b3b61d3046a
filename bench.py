"""
Benchmarks of ops.py's pieces in the model (they print numbers; the tests check correctness, not speed). Its own
file because it imports both ops.py and model.py, which imports ops.py: beside them, never inside, so no circle.

    python bench.py          # peak memory and time of the chunked KL vs the naive formula (CPU/GPU)
    python bench.py decode --batches=1,4 --contexts=1024,4096        # decode step: GQA vs MLA naive vs latent
    python bench.py decode --batches=1,8,64 --contexts=1024,8192,32768 --budget_gib=60   # the full grid (GPU)
    python bench.py sweep        # KL(teacher||student) at init on stories260K: ranks, svd vs random, dynamic
    python bench.py conversion   # time + peak memory of converting a random Llama-3.2-1B-shaped model
    python bench.py conversion --init=rorope --calib_tokens=2048   # the same, calibrated on random ids
    python bench.py --help
"""
import resource
import sys
import threading
import time

import torch
import torch.nn.functional as F

from configurator import configure
from errors import BadInput
from mamba2 import Mamba2, ssd_sequential
from model import Attention, KVCache, MLAttention, ModelConfig, Transformer, rope_cos_sin, rope_inv_freq
from ops import latent_attention, linear_kl, naive_linear_kl
from rorope import native_bf16
from svd_init import kl_per_token, teacher_text, upcycle


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
    Prints step time, tokens/s (batch / step time), cache bytes read per step / step time, and cache memory;
    returns the table's rows as dicts (scripts/gpu_check.py sets them against the device's copy bandwidth)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    esize = torch.empty((), dtype=dt).element_size()
    rq = {512: 864, 256: 1184, 128: 1344, 64: 1424, 48: 1440}
    base = dict(vocab_size=8, dim=2048, n_layers=1, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8,
                rope_theta=500000.0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    spreads, table = [], []

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
                table.append(dict(variant=name, numbers_per_token=per_tok, batch=B, context=S, step_ms=1e3 * t,
                                  core_ms=1e3 * core, bytes_read=B * S * per_tok * esize if per_tok else state_read,
                                  core_gb_s=gbs, core_vs_gqa=t_gqa / core, spread=spread))
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
    return table


# -----------------------------------------------------------------------------
# The conversion: the stories260K sweep (docs/init.md) and the Llama-3.2-1B-shaped conversion time
# (python bench.py sweep / python bench.py conversion)


def init_sweep(teacher, n_seq, seq_len, seed, n_random=5):
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


LLAMA_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8192,
                max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))  # Llama-3.2-1B's config, random weights


def conversion_bench(device, q_rank, kv_rank, qk_nope_dim, qk_rope_dim, init="svd", calib_tokens=2048, calib_seq_len=512,
                     shape=None):
    """Convert a random Llama-3.2-1B-shaped model (or ModelConfig fields `shape`); print wall time and peak memory,
    return them as a dict."""
    cfg = ModelConfig(**(shape or LLAMA_1B))
    with torch.device("meta"):
        src = Transformer(cfg)
    src.to_empty(device=device)
    params = list(src.parameters())

    def draw(k, n):  # N(0, 0.02) weights: one generator per thread (a single normal_ runs on one core)
        g = torch.Generator(device=device).manual_seed(k)
        with torch.no_grad():
            for p in params[k::n]:
                p.normal_(0, 0.02, generator=g)

    n = torch.get_num_threads() if device == "cpu" else 1
    workers = [threading.Thread(target=draw, args=(k, n)) for k in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    src._init_rope(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    calib = None
    if init == "rorope":  # random weights, random ids: the arithmetic and memory of a real conversion, not its quality
        calib = torch.randint(0, cfg.vocab_size, (-(-calib_tokens // calib_seq_len), calib_seq_len),
                              generator=torch.Generator().manual_seed(0))
        qk_nope_dim = cfg.head_dim
    t0 = time.time()
    student = upcycle(src, q_rank=q_rank, kv_rank=kv_rank, qk_nope_dim=qk_nope_dim, qk_rope_dim=qk_rope_dim,
                      init=init, calib=calib, copy=False)  # as the command line converts: no second copy
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n = sum(p.numel() for p in student.parameters())
    ncal = "" if calib is None else (f", {calib.numel()} calibration tokens, candidates scored in "
                                     f"{'bfloat16' if native_bf16(device) else 'float32'}")  # the machine decides
    what = "Llama-3.2-1B-shaped" if shape is None else f"d {cfg.dim}"
    print(f"converted a random {what} model ({cfg.n_layers} layers, init {init}, r_q {q_rank}, r_kv {kv_rank}, "
          f"d_qk {qk_nope_dim}, d_r {qk_rope_dim}{ncal}) on {device} with {torch.get_num_threads()} threads: "
          f"{dt:.1f} s; process peak RSS {rss1:.2f} GiB (source model alone: {rss0:.2f} GiB); {n:,} parameters")
    out = dict(seconds=dt, peak_rss_gib=rss1, parameters=n)
    if device.startswith("cuda"):
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak CUDA memory {out['peak_cuda_gib']:.2f} GiB")
    return out


if __name__ == "__main__":
    batches = "1,4"            # decode: batch sizes, comma-separated
    contexts = "1024,4096"     # decode: filled cache lengths, comma-separated
    budget_gib = 40.0          # decode: memory for the largest-batch table
    repeats = 5                # decode: timed calls per measurement (the median is reported, the spread checked)
    model = "tests/fixtures/stories260K"  # sweep: the teacher
    sweep_seqs = 16            # sweep: held-out sequences sampled from the teacher ...
    sweep_len = 256            # ... and their length
    seed = 0
    device = "cpu"             # conversion: where the conversion runs
    init = "svd"               # conversion: "svd" (Algorithm 1) or "rorope" (calibrated on random ids)
    q_rank = 1424              # conversion: the ranks of the converted Llama-3.2-1B shape
    kv_rank = 64
    qk_nope_dim = 32
    qk_rope_dim = 32
    calib_tokens = 2048        # conversion, init="rorope"
    calib_seq_len = 512
    MODES = ("loss", "decode", "sweep", "conversion")  # the first bare argument; not a setting
    _mode = sys.argv[1] if sys.argv[1:2] and sys.argv[1] in MODES else "loss"
    if _mode != "loss":
        sys.argv = sys.argv[:1] + sys.argv[2:]
    configure(globals())

    def _sizes(name, text):  # "1,4" (or a list) -> [1, 4]; anything else named before any work
        vals = [v.strip() for v in str(text).strip("[]()").split(",")]
        if not all(v.isdigit() and int(v) >= 1 for v in vals):
            raise BadInput(f"{name}={text!r}: give positive integers, comma-separated (e.g. --batches=1,8,64 "
                           "--contexts=1024,8192)")
        return [int(v) for v in vals]

    if repeats < 1 or budget_gib <= 0 or sweep_seqs < 1 or sweep_len < 2 or calib_tokens < 1 or calib_seq_len < 1:
        raise BadInput(f"repeats={repeats}, budget_gib={budget_gib}, sweep_seqs={sweep_seqs}, sweep_len={sweep_len}, "
                       f"calib_tokens={calib_tokens}, calib_seq_len={calib_seq_len}: need positive numbers "
                       "(sweep_len >= 2)")
    if _mode == "decode":
        _bench_decode(_sizes("batches", batches), _sizes("contexts", contexts), budget_gib=budget_gib,
                      repeats=repeats)
    elif _mode == "sweep":
        init_sweep(Transformer.from_pretrained(model).eval(), sweep_seqs, sweep_len, seed)
    elif _mode == "conversion":
        conversion_bench(device, q_rank, kv_rank, qk_nope_dim, qk_rope_dim, init, calib_tokens, calib_seq_len)
    else:
        _bench()
