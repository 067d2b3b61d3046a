"""
The training machinery that distill.py and dpo.py share, so each of them stays a readable top-to-bottom loop:
distributed set-up (torchrun or a world of one), FSDP2 sharding, the learning-rate schedule, the optimizer,
atomic resumable checkpoints (safetensors + JSON, never pickle), and rank-0 logging (text + JSON lines).

Nothing here runs by itself; see distill.py.
"""
import faulthandler
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from configurator import run_exit_handlers
from errors import BadInput, CannotWrite
from folders import (checkpoints, claim_out_dir, latest_checkpoint, load_tensors, save_tensors, write_failed,
                     write_json)


# -----------------------------------------------------------------------------
# Distributed set-up


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: object

    @property
    def master(self):
        return self.rank == 0


def init_distributed(device="auto"):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on CUDA (RCCL on ROCm, same API), gloo on CPU. A plain
    `python script.py` has none, so it becomes a world of one (gloo on an in-memory store): the FSDP2 code path
    is then the same for 1 and N processes."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    faulthandler.enable()  # a worker that dies in native code (SIGSEGV, SIGABRT) prints its Python stack first
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        _term_when_parent_dies()
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    else:
        rank, world, local = 0, 1, 0
        dist.init_process_group("gloo" if not device.startswith("cuda") else "nccl", store=dist.HashStore(),
                                rank=0, world_size=1)
    dev = torch.device(f"cuda:{local}" if device.startswith("cuda") else "cpu")
    mesh = init_device_mesh(dev.type, (world,))
    global _CPU_GROUP  # a gloo group for the per-step stop flag: a CPU collective, so no GPU sync
    _CPU_GROUP = dist.new_group(backend="gloo") if world > 1 and dev.type != "cpu" else None
    return Dist(rank, world, local, dev, mesh)


_CPU_GROUP = None


def _term_when_parent_dies():
    """A torchrun worker whose launcher is killed (kill -9 leaves no chance to forward a signal) would train on as
    an orphan: ask Linux to send it SIGTERM when its parent dies; the loop then stops at the next step with a
    checkpoint."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:          # the parent died before prctl: nobody will send it
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: no orphan protection


def shard(model, d: Dist, param_dtype=None, shard_root=True, compile=False, checkpointing=False):
    """FSDP2: each block is its own unit (gathered just before it runs, freed after), then the root (embeddings,
    final norm, head). On GPU the mixed-precision policy computes in bf16 with fp32 master weights and fp32
    gradient reduction. shard_root=False leaves the root's tensors replicated: used for the frozen teacher, whose
    output head the chunked loss reads outside its forward."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = dict(mesh=d.mesh, **({"mp_policy": mp} if mp else {}))
    model.activation_checkpointing = checkpointing
    for block in model.model.layers:
        if compile:
            block.compile()
        fully_shard(block, **kw)
    if shard_root:
        fully_shard(model, **kw)
    return model


def eval_chunks(n_items, chunk, d: Dist):
    """This rank's share of a fixed held-out set of n_items, in chunks of `chunk` items: chunk k goes to rank
    k % world, and ranks with fewer chunks get padding chunks (real=False, to be weighted 0) so every rank runs
    the same number of forwards (FSDP gathers in each). The numbers summed over ranks do not depend on world."""
    chunks = [list(range(a, min(a + chunk, n_items))) for a in range(0, n_items, chunk)]
    per_rank = -(-len(chunks) // d.world)
    mine = chunks[d.rank::d.world]
    return [(c, True) for c in mine] + [(chunks[0], False)] * (per_rank - len(mine))


def finish():
    """End a run once everything is written: destroy the process group, run the exit handlers (the out_dir lock),
    flush, and leave with os._exit(0). Why not a plain return: on a loaded 2-core machine, a 2-process gloo run that
    had finished and written everything was seen, rarely (2 of some hundreds), to abort in the interpreter's
    teardown ("terminate called without an active exception", SIGABRT): a failed exit code for a good run. Where in
    the teardown is not pinned down; skipping it is safe because nothing is left to write."""
    dist.destroy_process_group()
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def host_sum(x: float) -> float:
    """A number summed over ranks on the CPU (gloo): no GPU sync. For the token count a step is normalised by."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, group=_CPU_GROUP)  # None: the default group, gloo on CPU
    return float(t.item())


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# -----------------------------------------------------------------------------
# Optimisation


def lr_at(step, max_lr, total_steps, warmup_steps, min_lr):
    """Linear warmup to max_lr, then cosine decay to min_lr at total_steps: a pure function of the step."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def check_train_settings(betas, export_dtype):
    """Refusals, before any work, of settings that would otherwise fail at the first step or the export: AdamW's betas
    and the final model's dtype. Returns the export dtype as a torch dtype."""
    try:
        b = tuple(float(x) for x in betas)
    except (TypeError, ValueError):
        b = ()
    if len(b) != 2 or not all(0 <= x < 1 for x in b):
        raise BadInput(f"betas={betas!r}: AdamW takes two decay rates in [0, 1). Fix: e.g. --betas='(0.9, 0.98)'")
    export_dtype = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}.get(export_dtype,
                                                                                                     export_dtype)
    if export_dtype not in EXPORT_DTYPES:
        raise BadInput(f"export_dtype={export_dtype!r}: the final model is written as one of "
                       f"{', '.join(EXPORT_DTYPES)}. Fix: --export_dtype=bfloat16 (half the size) or float32")
    return getattr(torch, export_dtype)


def make_optimizer(model, lr, betas, weight_decay):
    """AdamW; weight decay on matrices only (not on norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=1e-8)


# -----------------------------------------------------------------------------
# Checkpoints: <out_dir>/ckpt-<step>/ {model.safetensors, optimizer.safetensors, rng-rank<r>.safetensors,
# meta.json}. Written into ckpt-<step>.tmp and renamed only when every file is there, so a crash mid-save leaves
# a .tmp folder that resume ignores (and the next save removes).

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _rng_state():
    s = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def save_checkpoint(out_dir, step, model, optimizer, meta, d: Dist, keep=2, _before_rename=None):
    final = os.path.join(out_dir, f"ckpt-{step:07d}")
    tmp = final + ".tmp"
    msd = get_model_state_dict(model, options=FULL)          # every rank takes part; only rank 0 receives tensors
    osd = get_optimizer_state_dict(model, optimizer, options=FULL)
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    error = None
    try:
        _write_checkpoint_files(tmp, msd, osd, meta, step, d)
    except Exception as e:  # a full disk: OSError, or safetensors' own error for the same
        if not write_failed(e):
            raise
        error = e
    failed = torch.tensor([float(error is not None)])
    if d.world > 1:  # every rank learns that one failed, so none waits for it at the next collective
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=_CPU_GROUP)
    if failed.item():
        if d.master:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-written folder left behind
        why = f"{type(error).__name__}: {error}" if error is not None else "on another rank"
        prev = latest_checkpoint(out_dir)
        raise CannotWrite(f"writing checkpoint {tmp} failed ({why}); nothing was renamed, "
                          + (f"the previous checkpoint {prev} is intact" if prev else "there was no earlier checkpoint")
                          + ". Fix: free disk space, then resume with --resume=True")
    barrier()
    if d.master:
        if _before_rename:
            _before_rename()                                  # tests: die here, mid-save
        for name in os.listdir(tmp):                          # make the files durable before the rename
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(final):  # the same step saved before (a re-run): swap, then remove the old one
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        for old in checkpoints(out_dir)[:-keep]:  # by step number; only names a run writes (folders.CKPT)
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _write_checkpoint_files(tmp, msd, osd, meta, step, d: Dist):
    save_tensors(_rng_state(), os.path.join(tmp, f"rng-rank{d.rank}.safetensors"))
    if d.master:
        save_tensors({k: v.contiguous() for k, v in _untie(msd).items()}, os.path.join(tmp, "model.safetensors"))
        flat = {f"{fqn}::{k}": v.reshape(-1) if v.dim() == 0 else v for fqn, st in osd["state"].items()
                for k, v in st.items()}
        save_tensors(flat, os.path.join(tmp, "optimizer.safetensors"))
        write_json(os.path.join(tmp, "meta.json"), {**meta, "step": step, "world": d.world,
                                                    "param_groups": osd["param_groups"]})


def _untie(sd):
    """safetensors refuses two names for one storage (a tied head): store each storage once."""
    seen, out = {}, {}
    for k, v in sd.items():
        if v.data_ptr() in seen:
            continue
        seen[v.data_ptr()] = k
        out[k] = v
    return out


# -----------------------------------------------------------------------------
# The output folder: one run at a time, only its own files touched (folders.py's rules), checked before any work


def prepare_out_dir(out_dir, resume, d: Dist, log_name, need_bytes=0):
    """Pre-flight for a training run, after every setting has been checked and before any work. On rank 0
    (folders.claim_out_dir):
      - refuse an out_dir holding anything this project's runs do not write (folders.run_names: `ckpt-0000200`,
        `final`, the run's log, ...; a link, `.`, a checkout or a data folder is refused);
      - take the lock out_dir/.lock (pid@host); a lock whose process is gone is stale and taken over;
      - refuse when the disk cannot hold need_bytes (the checkpoints and the export);
      - resume=False: move an earlier run's files (only the run's own) to replaced-<time>/;
        resume=True: there must be a checkpoint; resume="auto": resume if there is one, else start fresh.
    Returns whether to resume. Every rank gets the same answer."""
    verdict = torch.zeros(1)
    if d.master:
        verdict[0] = float(claim_out_dir(out_dir, resume, log_name, need_bytes))
    if d.world > 1:
        t = verdict.to(d.device)
        dist.broadcast(t, src=0)
        verdict = t.cpu()
    return bool(verdict[0].item())


def checkpoint_bytes(n_params, keep_ckpts, export_bytes_per_param=4):
    """Disk a run needs: keep_ckpts + 1 checkpoints (fp32 weights + two AdamW moments; one more is written before
    the oldest is pruned) and the exported model."""
    return n_params * (4 * 3 * (keep_ckpts + 1) + export_bytes_per_param)


def check_resume_config(path, config, model_keys, schedule_keys, log):
    """Compare the settings a checkpoint was written with against this run's: a changed model (or data) setting is
    refused, naming the keys; a changed schedule is allowed with a warning."""
    with open(os.path.join(path, "meta.json")) as f:
        saved = json.load(f).get("config", {})
    config = json.loads(json.dumps(config))  # as the checkpoint holds it: tuples are JSON lists there
    changed = [k for k in model_keys if k in saved and saved[k] != config.get(k)]
    if changed:
        raise BadInput(f"resume: {path} was written with other model/data settings: "
                       + ", ".join(f"{k} {saved[k]!r} -> {config.get(k)!r}" for k in changed)
                       + ". Fix: resume with the saved settings (run_config in meta.json), or start a fresh run "
                           "in a new out_dir")
    moved = [k for k in schedule_keys if k in saved and saved[k] != config.get(k)]
    if moved:
        log.print("resume: WARNING: the schedule changed since the checkpoint: "
                  + ", ".join(f"{k} {saved[k]!r} -> {config.get(k)!r}" for k in moved)
                  + " (the learning rate from here on follows the new settings)")


def load_checkpoint(path, model, optimizer, d: Dist):
    """Restore model, optimizer and this rank's RNG from `path`: rank 0 reads the model and optimizer (then
    broadcasts), every rank its RNG, each tensor checked against the CRC-32 its file carries. -> (meta, "") or, where
    any rank could not read its share, (None, why) with nothing restored (every rank learns it: one tiny all-reduce)."""
    from safetensors import SafetensorError
    msd, osd, problem = {}, {}, ""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        rng_file = os.path.join(path, f"rng-rank{d.rank}.safetensors")  # a rank the writer did not have: rank 0's
        rng = load_tensors(rng_file if os.path.exists(rng_file) else os.path.join(path, "rng-rank0.safetensors"))
        if d.master:
            msd = load_tensors(os.path.join(path, "model.safetensors"))
            if getattr(model.config, "tie_embeddings", False):
                msd.setdefault("lm_head.weight", msd.get("model.embed_tokens.weight"))
                msd.setdefault("model.embed_tokens.weight", msd.get("lm_head.weight"))
            state = {}
            for key, v in load_tensors(os.path.join(path, "optimizer.safetensors")).items():
                fqn, k = key.split("::")
                state.setdefault(fqn, {})[k] = v.reshape(()) if k == "step" else v
            osd = {"state": state, "param_groups": meta["param_groups"]}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        problem = f"{type(e).__name__}: {e}"
    if host_sum(float(bool(problem))) > 0:
        return None, problem or "a tensor another rank read"
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, optimizer, osd, options=opts)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta, ""


def resume_step(resume, out_dir, model, optimizer, d: Dist, log):
    """With resume (prepare_out_dir's answer): restore the newest checkpoint in out_dir that reads whole and return
    its step (a newer damaged one is named and passed over); else 0. The bytes are read once, by the load itself."""
    if not resume:
        return 0
    for path in reversed(checkpoints(out_dir)):
        problem = checkpoint_problem(path)  # headers: every rank decides alike
        if problem is None:
            meta, problem = load_checkpoint(path, model, optimizer, d)
            if meta is not None:
                log.print(f"resume: {path} (step {meta['step']})")
                return meta["step"]
        log.print(f"WARNING: {path} cannot be read ({problem}); resuming from the one before it")
    raise BadInput(f"no checkpoint in {out_dir} can be read. Fix: start afresh with --resume=False (the files are "
                   "moved aside, not deleted)")


def resumable_checkpoint(out_dir):
    """The newest checkpoint in out_dir whose files open (headers), or None where there is none; raises where there
    are checkpoints and none opens. For the pre-flight check of its settings; resume_step reads the tensors."""
    found = checkpoints(out_dir)
    for path in reversed(found):
        if checkpoint_problem(path) is None:
            return path
    if found:
        raise BadInput(f"no checkpoint in {out_dir} can be read (the newest: {checkpoint_problem(found[-1])}). "
                       "Fix: start afresh with --resume=False (the files are moved aside, not deleted)")
    return None


def checkpoint_problem(path):
    """Why the checkpoint at `path` cannot be resumed from (its meta.json or a safetensors header unreadable,
    truncated or missing), or None. Headers only, so cheap on every rank; a tensor's bytes are checked against their
    CRC-32 when load_checkpoint reads them."""
    from safetensors import SafetensorError, safe_open
    try:
        with open(os.path.join(path, "meta.json")) as f:
            json.load(f)["step"]
        for name in ("model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"):
            with safe_open(os.path.join(path, name), "pt") as g:
                g.keys()
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def export_model(model, path, d: Dist, run_config=None, dtype=None, tokenizer=None):
    """Gather the full weights on rank 0 and write an HF folder with save_pretrained (loadable by evaluate.py,
    dpo.py, Transformer.from_pretrained), recording `tokenizer` (a tokenizer.Tokenizer) in it."""
    from model import Transformer
    msd = get_model_state_dict(model, options=FULL)
    if d.master:
        with torch.device("meta"):
            plain = Transformer(model.config)
        if model.config.tie_embeddings:
            msd.pop("lm_head.weight", None)
        plain.load_state_dict({k: (v.to(dtype) if dtype else v) for k, v in msd.items()}, strict=False, assign=True)
        if model.config.tie_embeddings:
            plain.lm_head.weight = plain.model.embed_tokens.weight
        plain.save_pretrained(path, run_config=run_config, tokenizer=tokenizer)
    barrier()


# -----------------------------------------------------------------------------
# The loop


# -----------------------------------------------------------------------------
# What the loops of distill.py and dpo.py share (each script holds its own loop, top to bottom)


def check_finite(step, numbers, out_dir, log):
    """Stop the run (exit 1) when a logged number is NaN or Inf: before any checkpoint is written, so the last
    checkpoint is always a good one."""
    if not all(math.isfinite(v) for v in numbers.values() if isinstance(v, float)):
        log.print(f"step {step}: non-finite loss or gradient norm {numbers}; stopping. The last good checkpoint is "
                  f"{latest_checkpoint(out_dir)} (resume from it with a lower lr, or check the data)")
        raise SystemExit(1)


def step_line(done, max_steps, text, numbers, seconds, steps):
    """The log line of an interval of `steps` steps that took `seconds`."""
    return (f"step {done}/{max_steps}  {text}  lr {numbers['lr']:.2e}  grad norm {numbers['grad_norm']:.3f}  peak mem "
            f"{numbers['peak_mem_gib']:.2f} GiB  ETA {(max_steps - done) * seconds / steps / 60:.1f} min")


def debug_kill():
    """Tests only: SIGKILL this process (a crash after an update, or mid-way through a checkpoint save)."""
    os.kill(os.getpid(), signal.SIGKILL)


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption, or the launcher dying) only set a flag; the loop then
    stops at the end of the step with a checkpoint. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum, self.name = 0, ""
        self.old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum, self.name = signum, signal.Signals(signum).name
        print(f"\n{self.name}: stopping after this step (with a checkpoint); Ctrl-C again to abort at once",
              file=sys.stderr, flush=True)

    def agreed(self, d: Dist):
        """Whether any rank was asked to stop: one tiny all-reduce per step (on a gloo group when training on GPU,
        so it never waits for the GPU), so that every rank stops at the same step."""
        if d.world == 1:
            return bool(self.signum)
        flag = torch.tensor([float(self.signum)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_CPU_GROUP)  # None: the default group (gloo on CPU)
        if flag.item() and not self.signum:
            self.signum = int(flag.item())
            self.name = signal.Signals(self.signum).name + " (on another rank)"
        return bool(flag.item())

    def restore(self):
        for sig, old in self.old.items():
            signal.signal(sig, old)

    def exit(self, d: Dist, done, max_steps, log):
        """After the checkpoint of the step at which the ranks agreed to stop: the command that resumes, then exit."""
        launcher = f"torchrun --nproc_per_node={d.world}" if d.world > 1 else "python"
        cmd = " ".join([launcher] + [a for a in sys.argv if not a.startswith("--resume")] + ["--resume=True"])
        log.print(f"stopped by {self.name} at step {done}/{max_steps}; resume with: {cmd}")
        self.restore()
        raise SystemExit(128 + self.signum)


# -----------------------------------------------------------------------------
# Logging (rank 0): a readable line per interval and the same numbers as JSON lines for plotting


class RunLog:
    def __init__(self, out_dir, d: Dist, name="log"):
        self.master = d.master
        self.t0 = time.time()
        if self.master:
            os.makedirs(out_dir, exist_ok=True)
            self.jsonl = open(os.path.join(out_dir, f"{name}.jsonl"), "a")
            self.txt = open(os.path.join(out_dir, f"{name}.txt"), "a")

    def print(self, msg, shown=False):
        """To stdout and the run's .txt log (shown=True: already printed, to the log only)."""
        if self.master:
            if not shown:
                print(msg, flush=True)
            self.txt.write(msg + "\n")
            self.txt.flush()

    def record(self, kind, **values):
        if self.master:
            self.jsonl.write(json.dumps({"kind": kind, "time": round(time.time() - self.t0, 3), **values}) + "\n")
            self.jsonl.flush()


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB; the process's peak RSS
