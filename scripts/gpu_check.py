"""
A GPU's first contact: every CUDA / ROCm path of the project checked and timed in one run, each check in its own
process with its own time limit (a crash, a hang or a poisoned CUDA context in one does not hide the rest). No
downloads: the bundled tiny models, and random weights of real shapes (SmolLM2-135M, Llama-3.2-1B) where size
matters. Prints one table (check, pass/fail, the number, the device) and writes the same as JSON.

    python scripts/gpu_check.py                                   # one GPU (ROCm too): the eight checks (never run yet)
    python scripts/gpu_check.py --checks=decode,distill           # some of them
    python scripts/gpu_check.py --dry_run=True                    # CPU, tiny shapes: the same code paths (the tests)
    python scripts/gpu_check.py --help

The checks (docs/gpu.md says where their numbers go):
  parity    tiny teacher, tiny MLA student, random SmolLM2-shaped model: logits in fp32 and bf16 on the GPU vs fp32
            on the CPU (error / largest logit); greedy tokens equal on the tiny models; the student's bf16 top-1
            agreement and KL with its fp32 self on the GPU (model.precision_probe)
  decode    naive == absorbed == latent == compiled latent decode step; the decode grid (bench.py decode: batch
            1/8/64 x context 1K/8K/32K, Llama-3.2-1B layer, r_kv 512 and 64) with the bytes each step reads as a
            fraction of the device's copy bandwidth, measured in the same run
  distill   torchrun, 1 GPU (and 2 over NCCL where there are 2): a Llama-3.2-1B-shaped random teacher and its
            upcycled student, bf16, sequence 2048, 20 steps: tokens/s, MFU, peak memory with the chunked loss vs
            the full-logit loss; a run killed after its checkpoint and resumed gives the same next loss
  dpo       5 steps of dpo.py on the tiny student on the GPU: the losses of the CPU run
  svd_init  Algorithm 1 and init="rorope" (calibration, float64 linear algebra on the device): the CPU's student;
            time of a Llama-3.2-1B-shaped conversion
  mamba2    chunked SSD scan vs the sequential one (CPU, float64); a hybrid's greedy decode vs the CPU's; whole-model
            decode tokens/s of GQA, MLA and a Zebra hybrid at 8K and 32K
  export    DeepSeek-V3 export of a tiny student, loaded by transformers on the GPU: its logits vs ours
  evaluate  evaluate.py's scoring of the nine tasks on the bundled fixture slices: the CPU's scores
"""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

from bench import LLAMA_1B, _bench_decode, conversion_bench  # noqa: E402
from configurator import configure  # noqa: E402
from errors import BadInput  # noqa: E402
from folders import check_results_file, write_results_file  # noqa: E402
from model import MLAttention, ModelConfig, Transformer, precision_probe  # noqa: E402
from svd_init import FRAGILE_KL, teacher_text, upcycle  # noqa: E402

# -----------------------------------------------------------------------------
# settings
dry_run = False            # CPU, tiny shapes, seconds per check: the same code paths, for the tests
checks = "all"             # comma-separated names (see above) or "all"
out = "out/gpu_check.json"  # the results (one of ours is replaced; any other file is refused)
scratch = "out"            # a temporary folder is made here for models and runs (~25 GB on a GPU), then removed
time_scale = 1.0           # multiplies every check's time limit (a slow disk, a shared node)
jobs = 0                   # checks at a time; 0: one on a GPU (they would share it), two in a dry run
peak_flops = 0.0           # the device's dense bf16 FLOP/s for MFU; 0: from its name (H100/H200, A100, MI300X)
only = ""                  # internal: run this one check in this process and write its result to result_file
result_file = ""
config = configure(globals())
# -----------------------------------------------------------------------------

TINY_TEACHER = os.path.join(ROOT, "assets/models/tiny_teacher")
TINY_STUDENT = os.path.join(ROOT, "assets/models/tiny_kv8")
SMOLLM2 = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, intermediate_size=1536,
               max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True)
TINY_1B = dict(LLAMA_1B, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128)  # dry run
LIMITS = {"parity": 90, "decode": 150, "distill": 330, "dpo": 90, "svd_init": 150, "mamba2": 120, "export": 60,
          "evaluate": 60}  # seconds on a GPU; the dry run gets 60 each (time_scale multiplies both)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "MI300X": 1307e12, "MI325X": 1307e12, "MI250": 383e12}  # dense, from the vendors' data sheets
TOL = {torch.float32: 1e-4, torch.bfloat16: 0.1}  # of the largest |logit|: fp32 rounding; bf16 "not broken"


class Env:
    def __init__(self, dry, scratch_dir):
        self.dry, self.scratch = dry, scratch_dir
        self.dev = torch.device("cpu" if dry else "cuda")
        self.name = "cpu" if dry else "cuda"
        self.n_gpu = 0 if dry else torch.cuda.device_count()

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()


def rel_err(got, want):
    """max |got - want| / max |want|, in float64 on the CPU: an error on the scale of the numbers compared."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def random_weights(model, seed=0):
    """Unit-scale activations (std fan_in^-1/2, embeddings std 1) and perturbed norms: at std 0.02 the logits are
    near-uniform and a wrong kernel hides under any tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed_tokens" in n else p.shape[1] ** -0.5))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def random_on(shape, dev, dtype, seed=0):
    """A random model of ModelConfig fields `shape` built straight on `dev` (std 0.02: a 1B model never on the CPU)."""
    with torch.device("meta"):
        m = Transformer(ModelConfig(**shape))
    m.to_empty(device=dev)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    m._init_rope(dev)
    return m.to(dtype).eval()


def ids_for(model, shape, seed=0):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def run(args, timeout, cwd=ROOT):
    """A command of the project (python or torchrun) with its output shown; returns its exit code."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print("  $ " + " ".join(args), flush=True)
    return subprocess.run(args, cwd=cwd, env=env, timeout=timeout).returncode


def records(out_dir, log, kind="train"):
    with open(os.path.join(out_dir, f"{log}.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


# -----------------------------------------------------------------------------
# The checks: each returns {"passed": bool or None (skipped), "number": the headline, "values": {...}}


@torch.no_grad()
def check_parity(e):
    v, ok = {}, True
    models = {"tiny teacher": lambda: Transformer.from_pretrained(TINY_TEACHER),
              "tiny MLA student": lambda: Transformer.from_pretrained(TINY_STUDENT),
              "SmolLM2-shaped random": lambda: random_weights(
                  Transformer(ModelConfig(**dict(SMOLLM2, n_layers=2 if e.dry else 30))))}
    for name, make in models.items():
        ref = make().eval()
        ids = ids_for(ref, (2, 64))
        want = ref(ids)
        for dt in (torch.float32, torch.bfloat16):
            m = copy.deepcopy(ref).to(e.dev, dt)
            err = rel_err(m(ids.to(e.dev)), want)
            v[f"{name} {str(dt)[6:]} error/max|logit|"] = err
            ok &= err <= TOL[dt]
            if dt == torch.float32 and name.startswith("tiny"):
                same = torch.equal(m.generate(ids[:, :8].to(e.dev), 24).cpu(), ref.generate(ids[:, :8], 24))
                v[f"{name} greedy 24 tokens equal"] = same
                ok &= same
            del m
    worst = max(x for k, x in v.items() if "bfloat16" in k)
    # an upcycled student in bf16 against its fp32 self, on the device, on text it writes: issue 33's fragile
    # students pass every logit-scale check above and fail here
    stu = Transformer.from_pretrained(TINY_STUDENT, device=e.dev).eval()
    kl, agree = precision_probe(stu, teacher_text(stu, 4, 64), torch.bfloat16)
    v.update({"tiny MLA student bf16 vs fp32 KL": kl, "tiny MLA student bf16 vs fp32 top-1 agreement": agree})
    ok &= kl <= FRAGILE_KL
    return dict(passed=ok, number=f"fp32 {max(x for k, x in v.items() if 'float32' in k):.1e}, bf16 {worst:.1e} of "
                f"the largest logit; student bf16 top-1 {100 * agree:.1f}% of its fp32 self", values=v)


def copy_bandwidth(e, nbytes):
    """GB/s of a device-to-device copy (bytes read + written): the memory bandwidth this device reaches."""
    x = torch.empty(nbytes // 4, device=e.dev)
    y = torch.empty_like(x)
    y.copy_(x)
    e.sync()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        y.copy_(x)
        e.sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


@torch.no_grad()
def check_decode(e):
    m = Transformer.from_pretrained(TINY_STUDENT, device=e.dev).eval()
    prompt, nxt = ids_for(m, (2, 8)).to(e.dev), ids_for(m, (2, 1), 1).to(e.dev)

    def step_logits(step):
        m.setup_caches(2, 16)
        m.reset_caches()
        m(prompt, input_pos=torch.arange(8, device=e.dev))
        return step(nxt, torch.tensor([8], device=e.dev)).clone()  # a CUDA graph's output is overwritten next call

    outs = {}
    for path in ("naive", "absorbed", "latent"):
        for b in m.model.layers:
            if isinstance(b.self_attn, MLAttention):
                b.self_attn.path = path
        outs[path] = step_logits(m.decode_step)
    outs["compiled latent"] = step_logits(m.compiled_decode_step("eager" if e.dry else "inductor"))
    v = {f"{k} vs naive": rel_err(outs[k], outs["naive"]) for k in ("absorbed", "latent", "compiled latent")}
    ok = all(x <= TOL[torch.float32] for x in v.values())
    del m
    bw = copy_bandwidth(e, 2**24 if e.dry else 2**31)
    v["copy bandwidth GB/s"] = bw
    rows = _bench_decode([1] if e.dry else [1, 8, 64], [64] if e.dry else [1024, 8192, 32768],
                         ranks=(64,) if e.dry else (512, 64), budget_gib=100.0, repeats=2 if e.dry else 5)
    for r in rows:
        r["bandwidth_fraction"] = r["core_gb_s"] / bw
    v["grid"] = rows
    big = [r for r in rows if r["batch"] == max(x["batch"] for x in rows) and r["context"] == max(
        x["context"] for x in rows)]
    lat = next(r for r in big if r["variant"].endswith("64 latent"))
    return dict(passed=ok, values=v, number=f"paths {max(v[k] for k in v if k.endswith('naive')):.1e}; r_kv 64 "
                f"latent at B {lat['batch']} x {lat['context']}: {lat['core_vs_gqa']:.1f}x GQA, "
                f"{100 * lat['bandwidth_fraction']:.0f}% of copy bw ({bw:.0f} GB/s)")


def check_distill(e):
    work = os.path.join(e.scratch, "distill")
    shape = TINY_1B if e.dry else LLAMA_1B
    S, mb, steps = (64, 2, 4) if e.dry else (2048, 4, 20)
    teacher = os.path.join(work, "teacher")
    src = random_on(shape, e.dev, torch.bfloat16)
    n_teacher = sum(p.numel() for p in src.parameters())
    src.save_pretrained(teacher)
    del src
    ranks = ["--q_rank=48", "--kv_rank=8", "--qk_nope_dim=8", "--qk_rope_dim=8"] if e.dry else \
        ["--q_rank=1424", "--kv_rank=64", "--qk_nope_dim=32", "--qk_rope_dim=32"]  # config/llama1b_kv64.py's
    common = [f"--init_from={teacher}", "--init=svd", *ranks, "--tokenizer=llama3", f"--data_cache={work}/cache",
              f"--seq_len={S}", f"--micro_batch={mb}", "--eval_every=100000", "--eval_batches=1",
              "--ckpt_every=100000", "--keep_ckpts=1", "--export_dtype=bfloat16", "--dtype=bfloat16",
              f"--device={e.name}", "--warmup_frac=0", "--lr=1e-4"]
    v, ok = {}, True

    def distill(name, n_proc, n_steps, *extra, limit=120):
        d = os.path.join(work, name)
        rc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_proc}",
                  "distill.py", *common, f"--tokens_per_step={mb * S * n_proc}", f"--max_steps={n_steps}",
                  f"--out_dir={d}", *extra], limit * time_scale)
        if rc != 0:
            raise RuntimeError(f"distill.py run {name!r} failed (exit {rc}); its output is above")
        recs = records(d, "distill")
        log = open(os.path.join(d, "distill.txt")).read()
        n_student = int(log.split("student: ")[1].split(" parameters")[0].replace(",", ""))
        shutil.rmtree(d)  # a 1B run's checkpoint is ~18 GB: one at a time on the disk
        return recs, n_student

    recs, n_student = distill("chunked", 1, steps, "--log_every=2" if e.dry else "--log_every=5")
    tok_s = recs[-1]["tokens_per_s"]  # the last interval: past the first steps' warm-up
    flops = 6 * n_student + 2 * n_teacher
    name = "CPU" if e.dry else torch.cuda.get_device_name()
    peak = peak_flops or next((f for k, f in PEAK_BF16.items() if k in name), 0.0)
    v.update(tokens_per_s=tok_s, peak_mem_chunked_gib=max(r["peak_mem_gib"] for r in recs),
             student_params=n_student, teacher_params=n_teacher, flops_per_token=flops,
             mfu_formula="(6 N_student + 2 N_teacher) x tokens/s / (GPUs x peak bf16 FLOP/s)", peak_flops=peak,
             mfu=flops * tok_s / peak if peak else None, final_loss=recs[-1]["loss"])
    print(f"  MFU = (6 x {n_student:,} + 2 x {n_teacher:,}) x {tok_s:,.0f} tok/s / {peak:.3g} FLOP/s"
          + (f" = {100 * v['mfu']:.1f}%" if peak else ": no peak known for this device (set --peak_flops)"))
    recs, _ = distill("full_logits", 1, 2, "--log_every=1", f"--kl_chunk={mb * S}")  # one chunk: all logits at once
    v["peak_mem_full_logits_gib"] = max(r["peak_mem_gib"] for r in recs)
    if e.n_gpu >= 2:  # the same over NCCL on 2 processes
        recs, _ = distill("nccl2", 2, steps // 2, "--log_every=5")
        v["tokens_per_s_2gpu"] = recs[-1]["tokens_per_s"]
    # checkpoint and resume, on the tiny default (the same code; a 1B optimizer state would cost minutes of disk)
    d = os.path.join(work, "resume")
    tiny = ["distill.py", "config/tiny_kv8.py", f"--out_dir={d}", f"--data_cache={work}/cache_tiny", "--max_steps=6",
            "--ckpt_every=3", "--log_every=1", "--eval_every=1000", "--eval_batches=1", "--micro_batch=4",
            "--tokens_per_step=1024", "--init=svd", "--q_rank=256", "--qk_nope_dim=16", f"--device={e.name}"]
    run([sys.executable, *tiny, "--debug_kill_at_step=5"], 120 * time_scale)  # SIGKILL after step 5's update
    first = {r["step"]: r["loss"] for r in records(d, "distill")}
    if run([sys.executable, *tiny, "--resume=True"], 120 * time_scale) != 0:
        raise RuntimeError("the resumed distill.py run failed; its output is above")
    again = {r["step"]: r["loss"] for r in records(d, "distill")[len(first):]}
    v["resume_step_4_loss"] = (first.get(4), again.get(4))
    same = 4 in first and 4 in again and abs(first[4] - again[4]) <= 1e-5 * abs(first[4])
    ok &= same and min(again) == 4
    return dict(passed=ok, values=v, number=f"{tok_s:,.0f} tok/s" + (f", MFU {100 * v['mfu']:.1f}%" if peak else "")
                + f"; peak {v['peak_mem_chunked_gib']:.1f} vs {v['peak_mem_full_logits_gib']:.1f} GiB (full logits)"
                + f"; resume {'same' if same else 'DIFFERENT'} next loss")


def check_dpo(e):
    losses = {}
    for dev in ("cpu", e.name) if not e.dry else ("cpu", "cpu (again)"):
        d = os.path.join(e.scratch, "dpo", dev.replace(" ", "_"))
        rc = run([sys.executable, "dpo.py", "config/tiny_dpo.py", "--max_steps=5", "--log_every=1", "--ckpt_every=5",
                  "--eval_every=1000", "--eval_pairs=8", "--dtype=float32", f"--device={dev.split()[0]}",
                  f"--out_dir={d}"] + (["--pairs_per_step=8", "--max_length=128", "--max_prompt_length=64"]
                                       if e.dry else []), 60 * time_scale)
        if rc != 0:
            raise RuntimeError(f"dpo.py on {dev} failed (exit {rc}); its output is above")
        losses[dev] = [r["loss"] for r in records(d, "dpo")]
    a, b = losses.values()
    diff = max(abs(x - y) for x, y in zip(a, b))
    ok = len(a) == len(b) == 5 and diff <= 1e-3
    return dict(passed=ok, values=dict(losses=losses, max_abs_difference=diff),
                number=f"5 steps, largest loss difference {diff:.1e} (fp32)")


def check_svd_init(e):
    src_cpu = Transformer.from_pretrained(TINY_TEACHER).eval()
    src_dev = Transformer.from_pretrained(TINY_TEACHER, device=e.dev).eval()
    ids, calib = ids_for(src_cpu, (2, 64)), ids_for(src_cpu, (8, 256), 1)
    v, ok = {}, True
    for name, kw, tol in (("Algorithm 1", dict(init="svd", q_rank=128, kv_rank=16, qk_nope_dim=16, qk_rope_dim=16),
                           TOL[torch.float32]),
                          # the fold and weights fixed: a choice by calibration KL could flip between devices on a
                          # near tie, and then the students differ by design; fold 2 runs the folded path
                          ("rorope", dict(init="rorope", kv_rank=8, qk_rope_dim=16, rope_fold=2, weight_errors=True),
                           1e-3)):  # iterative fits: 1e-3
        with torch.no_grad():
            want = upcycle(src_cpu, **kw, calib=calib if name == "rorope" else None).eval()(ids)
            got = upcycle(src_dev, **kw, calib=calib.to(e.dev) if name == "rorope" else None).eval()(ids.to(e.dev))
        v[f"{name} student logits error/max"] = err = rel_err(got, want)
        ok &= err <= tol
    small = dict(vocab_size=1024, dim=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32, intermediate_size=512)
    for init in ("svd", "rorope"):
        r = conversion_bench(e.name, 128 if e.dry else 1424, 16 if e.dry else 64, 16 if e.dry else 32,
                             16 if e.dry else 32, init, calib_tokens=1024 if e.dry else 2048,
                             calib_seq_len=256 if e.dry else 512, shape=small if e.dry else None)
        v[f"conversion {init} seconds"] = r["seconds"]
    return dict(passed=ok, values=v, number=f"students {max(x for k, x in v.items() if 'error' in k):.1e}; "
                f"{'tiny' if e.dry else '1B-shaped'} conversion svd {v['conversion svd seconds']:.1f} s, rorope "
                f"{v['conversion rorope seconds']:.1f} s")


def check_mamba2(e):
    from evaluate import decode_speed
    from mamba2 import ssd_chunked, ssd_sequential
    from zebra import compose
    g = torch.Generator().manual_seed(0)
    b, T, H, P, N = (2, 100, 4, 16, 8) if e.dry else (2, 1000, 32, 64, 64)
    x, B_, C_ = (torch.randn(b, T, H, n, generator=g, dtype=torch.float64) for n in (P, N, N))
    dt = torch.nn.functional.softplus(torch.randn(b, T, H, generator=g, dtype=torch.float64) - 2)
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 4
    y_ref, s_ref = ssd_sequential(x, dt, A, B_, C_)
    y, s = ssd_chunked(*(t.float().to(e.dev) for t in (x, dt, A, B_, C_)), chunk=64)
    v = {"chunked scan (fp32, device) vs sequential (float64, CPU) y": rel_err(y, y_ref),
         "final state": rel_err(s, s_ref)}
    ok = max(v.values()) <= 1e-4
    src = Transformer.from_pretrained(TINY_TEACHER).eval()
    hyb = compose(src, [2], kv_rank=16, qk_nope_dim=16, qk_rope_dim=16, init="svd").eval()
    prompt = ids_for(src, (2, 8))
    same = torch.equal(copy.deepcopy(hyb).to(e.dev).generate(prompt.to(e.dev), 24).cpu(), hyb.generate(prompt, 24))
    v["hybrid greedy 24 tokens equal"] = same
    ok &= same
    # whole-model decode: GQA source, all-MLA (r_kv 64) and a Zebra hybrid (4 MLA layers of 16, the rest Mamba2)
    shape = TINY_1B if e.dry else LLAMA_1B
    src = random_on(shape, e.dev, torch.float32 if e.dry else torch.bfloat16)
    mla_kw = dict(init="svd", kv_rank=8 if e.dry else 64, qk_nope_dim=8 if e.dry else 32,
                  qk_rope_dim=8 if e.dry else 32)
    models = {"GQA": src, "MLA": upcycle(src, **mla_kw).eval(),
              "Zebra": compose(src, [1] if e.dry else [0, 5, 10, 15], **mla_kw).eval()}
    rows = []
    with torch.no_grad():
        for ctx in (64, 128) if e.dry else (8192, 32768):
            for batch in (1, 8):
                r = {k: decode_speed(m, batch, ctx, new_tokens=4 if e.dry else 16, repeats=1 if e.dry else 2,
                                     prefill=False)["decode_tokens_per_s"] for k, m in models.items()}
                rows.append(dict(context=ctx, batch=batch, **{f"{k} tokens_per_s": x for k, x in r.items()}))
                print(f"  decode B {batch} x {ctx}: " + ", ".join(f"{k} {x:,.0f} tok/s" for k, x in r.items()))
    v["decode"] = rows
    last = rows[-1]
    return dict(passed=ok, values=v, number=f"scan {v['chunked scan (fp32, device) vs sequential (float64, CPU) y']:.1e}"
                f"; B {last['batch']} x {last['context']}: Zebra {last['Zebra tokens_per_s']:,.0f} / MLA "
                f"{last['MLA tokens_per_s']:,.0f} / GQA {last['GQA tokens_per_s']:,.0f} tok/s")


def check_export(e):
    try:
        import transformers
    except ImportError:
        return dict(passed=None, values={}, number="skipped: transformers is not installed (pip install transformers)")
    from deepseek import compare_with_transformers
    src = Transformer.from_pretrained(TINY_TEACHER).eval()
    stu = upcycle(src, kv_rank=16, qk_nope_dim=16, qk_rope_dim=16, latent_norm="kv", latent_norm_init="ones").eval()
    folder = os.path.join(e.scratch, "export")
    stu.save_pretrained(folder, fmt="deepseek")
    err, top = compare_with_transformers(stu, folder, device=e.dev)
    return dict(passed=err / top <= TOL[torch.float32], values={"max |logit difference|": err, "max |logit|": top,
                                                                "transformers": transformers.__version__},
                number=f"DeepseekV3ForCausalLM vs ours: {err:.1e} (max |logit| {top:.1f})")


def check_evaluate(e):
    from evaluate import TASKS, load_docs, score_task
    from tokenizer import Tokenizer
    tok = Tokenizer.from_name("", TINY_STUDENT)
    docs = {t: load_docs(t, os.path.join(ROOT, "tests/fixtures/eval"), 2 if e.dry else None) for t in TASKS}
    scores = {}
    for dev in ("cpu", e.name):
        m = Transformer.from_pretrained(TINY_STUDENT, device=dev).eval()
        scores[dev] = {t: score_task(m, tok, t, docs[t], 16, tok.add_bos)[0] for t in TASKS}
    a, b = scores["cpu"], scores[e.name]
    keys = ("acc", "acc_norm")
    same = [t for t in TASKS if all(a[t].get(k) == b[t].get(k) for k in keys)]
    return dict(passed=len(same) == len(TASKS), values=dict(cpu=a, device=b),
                number=f"{len(same)}/{len(TASKS)} tasks score the same on {e.name} as on the CPU "
                f"({sum(a[t]['n'] for t in TASKS)} documents)")


CHECKS = {"parity": check_parity, "decode": check_decode, "distill": check_distill, "dpo": check_dpo,
          "svd_init": check_svd_init, "mamba2": check_mamba2, "export": check_export, "evaluate": check_evaluate}

# -----------------------------------------------------------------------------
# One check in this process (the driver below runs each of them so)

if only:
    if only not in CHECKS:
        raise BadInput(f"only={only!r}: not a check; the checks are {', '.join(CHECKS)}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    t0 = time.time()
    res = CHECKS[only](Env(dry_run, scratch))
    res["seconds"] = round(time.time() - t0, 1)
    with open(result_file, "w") as f:
        json.dump(res, f, default=str)
    sys.exit(0)

# -----------------------------------------------------------------------------
# The driver: every check in a process of its own, with its own time limit; one table and one JSON file

names = list(CHECKS) if checks == "all" else [c.strip() for c in str(checks).split(",")]
unknown = [n for n in names if n not in CHECKS]
if unknown:
    raise BadInput(f"checks={checks!r}: no check {', '.join(unknown)}. Fix: 'all' or some of {', '.join(CHECKS)}")
if not dry_run and not torch.cuda.is_available():
    raise BadInput(f"no CUDA or ROCm GPU is visible to torch {torch.__version__} (CUDA build "
                       f"{torch.version.cuda}, ROCm build {torch.version.hip}): this script checks the GPU paths. Fix: "
                       "run it on a GPU machine with a CUDA / ROCm build of torch (CUDA_VISIBLE_DEVICES not empty), or "
                       "--dry_run=True for the CPU rehearsal of the same code")
jobs = jobs or (2 if dry_run else 1)
# checks side by side share the cores: oversubscribed OpenMP threads spin against each other and run many times slower
threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))} if jobs > 1 else {}
out_path = os.path.abspath(os.path.expanduser(out))
check_results_file(out_path)  # before any work: only a file of ours is replaced
if dry_run:
    device = f"CPU (dry run, {torch.get_num_threads()} threads)"
else:
    p = torch.cuda.get_device_properties(0)
    device = (f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
              + (f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"))
print(f"gpu_check on {device}: {', '.join(names)}", flush=True)
os.makedirs(scratch, exist_ok=True)
work = tempfile.mkdtemp(prefix="gpu_check-", dir=scratch)
results, running, todo = {}, {}, list(names)


def start(name):
    """The check in a session of its own (a check past its limit is killed with all it started: torchrun's ranks);
    its output live with one job at a time, else into a log printed when it ends."""
    limit = (60 if dry_run else LIMITS[name]) * time_scale
    log = None if jobs == 1 else open(os.path.join(work, f"{name}.log"), "w+")
    print(f"\n=== {name} (limit {limit:.0f} s)", flush=True)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--only={name}", f"--dry_run={dry_run}",
                             f"--scratch={work}", f"--result_file={os.path.join(work, name + '.json')}",
                             f"--time_scale={time_scale}", f"--peak_flops={peak_flops}"], cwd=ROOT,
                            start_new_session=True, stdout=log, stderr=subprocess.STDOUT if log else None,
                            env={**os.environ, **threads})
    running[name] = (proc, time.time(), limit, log)


def finish(name, rc):
    proc, t0, limit, log = running.pop(name)
    if log is not None:
        log.seek(0)
        print(f"\n--- {name}'s output\n" + log.read(), end="", flush=True)
        log.close()
    rfile = os.path.join(work, f"{name}.json")
    if rc == 0 and os.path.exists(rfile):
        res = json.load(open(rfile))
    else:
        res = dict(passed=False, values={}, seconds=round(time.time() - t0, 1),
                   number=f"timed out after {limit:.0f} s" if rc is None else f"crashed (exit {rc}; see above)")
    results[name] = dict(check=name, **res)
    print(f"=== {name}: {'skipped' if res['passed'] is None else 'PASS' if res['passed'] else 'FAIL'} "
          f"- {res['number']} ({res['seconds']} s)", flush=True)


try:
    while todo or running:
        while todo and len(running) < jobs:
            start(todo.pop(0))
        time.sleep(0.05)
        for name, (proc, t0, limit, _) in list(running.items()):
            if proc.poll() is not None:
                finish(name, proc.returncode)
            elif time.time() - t0 > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                finish(name, None)
finally:
    shutil.rmtree(work, ignore_errors=True)

print(f"\n| check | result | number | seconds | device |\n|---|---|---|---|---|")
results = [results[n] for n in names]
for r in results:
    verdict = "skipped" if r["passed"] is None else "pass" if r["passed"] else "FAIL"
    print(f"| {r['check']} | {verdict} | {r['number']} | {r['seconds']} | {device} |")
write_results_file(out_path, {"device": device, "config": config, "checks": results}, "scripts/gpu_check.py")
print(f"wrote {out_path}")
failed = [r["check"] for r in results if r["passed"] is False]
if failed:
    print(f"failed: {', '.join(failed)}")
    sys.exit(1)
