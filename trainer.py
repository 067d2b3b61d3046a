"""
The training machinery that distill.py and dpo.py share, so each of them stays a readable top-to-bottom loop:
distributed set-up (torchrun or a world of one), FSDP2 sharding, the learning-rate schedule, the optimizer,
atomic resumable checkpoints (safetensors + JSON, never pickle), and rank-0 logging (text + JSON lines).

Nothing here runs by itself; see distill.py.
"""
import json
import math
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


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
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    else:
        rank, world, local = 0, 1, 0
        dist.init_process_group("gloo" if not device.startswith("cuda") else "nccl", store=dist.HashStore(),
                                rank=0, world_size=1)
    dev = torch.device(f"cuda:{local}" if device.startswith("cuda") else "cpu")
    mesh = init_device_mesh(dev.type, (world,))
    return Dist(rank, world, local, dev, mesh)


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
    from safetensors.torch import save_file
    final = os.path.join(out_dir, f"ckpt-{step:07d}")
    tmp = final + ".tmp"
    msd = get_model_state_dict(model, options=FULL)          # every rank takes part; only rank 0 receives tensors
    osd = get_optimizer_state_dict(model, optimizer, options=FULL)
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    save_file(_rng_state(), os.path.join(tmp, f"rng-rank{d.rank}.safetensors"))
    if d.master:
        save_file({k: v.contiguous() for k, v in _untie(msd).items()}, os.path.join(tmp, "model.safetensors"))
        flat = {f"{fqn}::{k}": v.reshape(-1) if v.dim() == 0 else v for fqn, st in osd["state"].items()
                for k, v in st.items()}
        save_file(flat, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "step": step, "world": d.world, "param_groups": osd["param_groups"]}, f, indent=2)
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
        for old in sorted(c for c in os.listdir(out_dir) if c.startswith("ckpt-") and not c.endswith(".tmp"))[:-keep]:
            shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    barrier()
    return final


def _untie(sd):
    """safetensors refuses two names for one storage (a tied head): store each storage once."""
    seen, out = {}, {}
    for k, v in sd.items():
        if v.data_ptr() in seen:
            continue
        seen[v.data_ptr()] = k
        out[k] = v
    return out


def start_out_dir(out_dir, resume, d: Dist):
    """A fresh run (resume=False) in a folder that holds an earlier run moves that run's checkpoints, logs and export
    into out_dir/replaced-<time>/ first: nothing is deleted, and a later --resume can never pick a stale checkpoint."""
    if d.master and not resume and os.path.isdir(out_dir):
        old = [n for n in os.listdir(out_dir) if n.startswith("ckpt-") or n == "final"
               or n.endswith((".jsonl", ".txt"))]
        if old:
            dest = os.path.join(out_dir, "replaced-" + time.strftime("%Y%m%d-%H%M%S"))
            os.makedirs(dest)
            for n in old:
                os.replace(os.path.join(out_dir, n), os.path.join(dest, n))
            print(f"{out_dir} held an earlier run: moved {', '.join(sorted(old))} to {dest} (use --resume=True to "
                  "continue a run instead)", flush=True)
    barrier()


def latest_checkpoint(out_dir):
    """The newest COMPLETE checkpoint (renamed into place, meta.json present), or None."""
    if not os.path.isdir(out_dir):
        return None
    done = sorted(c for c in os.listdir(out_dir) if c.startswith("ckpt-") and not c.endswith(".tmp")
                  and os.path.exists(os.path.join(out_dir, c, "meta.json")))
    return os.path.join(out_dir, done[-1]) if done else None


def load_checkpoint(path, model, optimizer, d: Dist):
    """Restore model, optimizer and this rank's RNG from `path` (rank 0 reads, then broadcasts). Returns meta."""
    from safetensors.torch import load_file
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    msd, osd = {}, {}
    if d.master:
        msd = load_file(os.path.join(path, "model.safetensors"))
        if getattr(model.config, "tie_embeddings", False):
            msd.setdefault("lm_head.weight", msd.get("model.embed_tokens.weight"))
            msd.setdefault("model.embed_tokens.weight", msd.get("lm_head.weight"))
        state = {}
        for key, v in load_file(os.path.join(path, "optimizer.safetensors")).items():
            fqn, k = key.split("::")
            state.setdefault(fqn, {})[k] = v.reshape(()) if k == "step" else v
        osd = {"state": state, "param_groups": meta["param_groups"]}
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, optimizer, osd, options=opts)
    rng_file = os.path.join(path, f"rng-rank{d.rank}.safetensors")  # a rank the writer did not have: rank 0's
    rng = load_file(rng_file if os.path.exists(rng_file) else os.path.join(path, "rng-rank0.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta


def resume_step(resume, out_dir, model, optimizer, d: Dist, log):
    """With resume: restore the newest complete checkpoint in out_dir and return its step; else (or if none) 0."""
    path = latest_checkpoint(out_dir) if resume else None
    if resume and path is None:
        log.print(f"resume: no complete checkpoint in {out_dir}; starting from step 0")
    if path is None:
        return 0
    step = load_checkpoint(path, model, optimizer, d)["step"]
    log.print(f"resume: {path} (step {step})")
    return step


def export_model(model, path, d: Dist, run_config=None, dtype=None, tokenizer_from=None):
    """Gather the full weights on rank 0 and write an HF folder with save_pretrained (loadable by evaluate.py,
    dpo.py, Transformer.from_pretrained), with the tokenizer files of the folder `tokenizer_from`, if any."""
    from model import Transformer, copy_tokenizer_files
    msd = get_model_state_dict(model, options=FULL)
    if d.master:
        with torch.device("meta"):
            plain = Transformer(model.config)
        if model.config.tie_embeddings:
            msd.pop("lm_head.weight", None)
        plain.load_state_dict({k: (v.to(dtype) if dtype else v) for k, v in msd.items()}, strict=False, assign=True)
        if model.config.tie_embeddings:
            plain.lm_head.weight = plain.model.embed_tokens.weight
        plain.save_pretrained(path, run_config=run_config)
        if tokenizer_from:
            copy_tokenizer_files(tokenizer_from, path)
    barrier()


# -----------------------------------------------------------------------------
# The loop


def fit(model, optimizer, d: Dist, log, micro_batches, report, evaluate, *, start_step, max_steps, lr_fn,
        grad_clip, n_stats, log_every, eval_every, ckpt_every, out_dir, keep_ckpts, meta,
        debug_kill_at_step=-1, debug_kill_in_save=-1):
    """The optimisation loop of distill.py and dpo.py; what differs between them comes in as functions:
        micro_batches(step) -> list of closures, one per micro-batch of this rank; each returns (loss, stats)
                               with the loss already normalised for the whole step and stats a (n_stats,) tensor
        report(stats, seconds, steps) -> (text, numbers): stats summed over ranks and steps since the last report
        evaluate() -> (text, numbers) on held-out data
    Per step: set the LR, accumulate gradients (reduce-scattered once, on the last micro-batch), clip, update.
    Per interval: one host sync to log, a held-out evaluation, an atomic checkpoint. Non-finite numbers stop the
    run before anything is saved, so the last checkpoint is always a good one."""
    stats = torch.zeros(n_stats, device=d.device)
    grad_norm = torch.zeros((), device=d.device)
    t_last, since = time.time(), 0

    def stop_if_not_finite(step, numbers):
        if not all(math.isfinite(v) for v in numbers.values() if isinstance(v, float)):
            log.print(f"step {step}: non-finite loss or gradient norm {numbers}; stopping. The last good "
                      f"checkpoint is {latest_checkpoint(out_dir)} (resume from it with a lower lr, or check the data)")
            raise SystemExit(1)

    for step in range(start_step, max_steps):
        lr = lr_fn(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        closures = micro_batches(step)
        for m, micro in enumerate(closures):
            model.set_requires_gradient_sync(m == len(closures) - 1)  # reduce-scatter once per step
            loss, s = micro()
            loss.backward()
            stats += s
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        since += 1
        done = step + 1
        if done == debug_kill_at_step:  # tests: a crash right after an update, before its checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        if done % log_every == 0 or done == max_steps:
            dist.all_reduce(stats)
            dt = time.time() - t_last
            text, numbers = report(stats, dt, since)  # the one host sync per interval happens in here
            numbers.update(lr=lr, grad_norm=grad_norm.item(), peak_mem_gib=peak_memory_gib(d.device))
            stop_if_not_finite(done, numbers)
            log.print(f"step {done}/{max_steps}  {text}  lr {lr:.2e}  grad norm {numbers['grad_norm']:.3f}  "
                      f"peak mem {numbers['peak_mem_gib']:.2f} GiB  ETA {(max_steps - done) * dt / since / 60:.1f} min")
            log.record("train", step=done, **numbers)
            stats.zero_()
            t_last, since = time.time(), 0
        if done % eval_every == 0 and done != max_steps:
            text, numbers = evaluate()
            log.print(f"held-out at step {done}: {text}")
            log.record("eval", step=done, **numbers)
        if done % ckpt_every == 0 or done == max_steps:
            stop_if_not_finite(done, {"loss": loss.item(), "grad_norm": grad_norm.item()})
            kill = (lambda: os.kill(os.getpid(), signal.SIGKILL)) if done == debug_kill_in_save else None
            log.print(f"checkpoint {save_checkpoint(out_dir, done, model, optimizer, meta, d, keep_ckpts, kill)}")


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

    def print(self, msg):
        if self.master:
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
