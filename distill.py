"""
End-to-end distillation of an upcycled MLA student from a frozen teacher (X-EcoMLA §4.2): minimise
KL(teacher || student) per token over every token of an SFT chat mix (+ an optional CE term).

    python distill.py config/tiny_kv8.py                                          # CPU, a world of one
    torchrun --standalone --nproc_per_node=2 distill.py config/tiny_kv8.py        # CPU, 2 processes (gloo)
    torchrun --standalone --nproc_per_node=8 distill.py config/llama1b_kv64.py    # one 8-GPU node (NCCL)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        distill.py config/llama1b_kv64.py                                         # 4 nodes (same command on each)
    python distill.py config/tiny_kv8.py --resume=True                            # continue from the last checkpoint

With ild=True it runs Zebra-Llama's intermediate-layer distillation instead (zebra.py): each converted layer on the
teacher's hidden states, trained to give the teacher's next ones; the teacher is then the source the student was
converted from. Zebra-Llama's pipeline: zebra.py composes the hybrid, then ILD, then the KL (see zebra.py).

The same script pre-trains the tiny CPU teacher with CE only (config/tiny_teacher.py: init_from="scratch",
kl_weight=0, ce_weight=1). Settings below; a config file, then --key=value, overrides them (configurator.py).
"""
import os
import time
from dataclasses import fields

import torch
import torch.distributed as dist

from configurator import configure, require
from data import BUNDLED_SFT, PackedData, build_cache, check_sources
from errors import BadInput
from folders import check_apart, resolve_checkpoint
from ops import linear_kl
from model import ModelConfig, Transformer, read_model_config, resolve_dtype
from svd_init import Conversion, upcycle
from tokenizer import Tokenizer, check_tokenizer_for
from zebra import converted_layers, ild_errors
from trainer import (RunLog, StopRequest, barrier, check_finite, check_resume_config, check_train_settings,
                     checkpoint_bytes, debug_kill, eval_chunks, export_model, finish, host_sum, init_distributed, lr_at,
                     make_optimizer, peak_memory_gib, prepare_out_dir, resumable_checkpoint, resume_step,
                     save_checkpoint, shard, step_line)

# -----------------------------------------------------------------------------
# settings
# student: upcycled from init_from with the MLA settings below, or loaded ready-made from student_from
init_from = "assets/models/tiny_teacher"   # HF Llama folder / hub id the student is built from; "scratch": random
student_from = ""          # an already converted (MLA) folder: skips upcycling
model_config = {}          # ModelConfig fields for init_from="scratch"
conversion = Conversion()  # svd_init.py's settings, each a setting here (--kv_rank, --init, ...; --help lists
                           # them); none given: no conversion (plain fine-tuning). init="rorope" calibrates on this
                           # run's own train data
calib_tokens = 8192        # rorope: calibration tokens, a seeded choice of train sequences of calib_seq_len
calib_seq_len = 0          # 0: seq_len
# teacher: any Llama with the same vocabulary; "" = init_from (self-distillation); "none" = no teacher (CE only;
# with a teacher and kl_weight = 0 it is still used to measure the held-out KL)
teacher = ""
# loss: kl_weight KL(teacher || student) + ce_weight CE, averaged over the target tokens
kl_weight = 1.0
ce_weight = 0.0
kl_chunk = 1024            # tokens per chunk of the chunked loss (ops.linear_kl)
loss_on = "all"            # "all" tokens (the paper) or "assistant" tokens only
ild = False                # intermediate-layer distillation (zebra.py) instead of the KL; teacher = the source
# data
sft_data = list(BUNDLED_SFT)  # files or hub ids (data.py); the bundled mix
tokenizer = ""             # "" = the model folder's own; or "llama3", "bytes", a folder, a tokenizer.model path
data_cache = "out/data_cache"
val_every = 50             # every 50th document is held out
seq_len = 256
# optimisation
tokens_per_step = 16384    # global batch in tokens; gradient accumulation is derived from it
micro_batch = 8            # sequences per micro-batch per process
max_steps = -1             # -1: `epochs` passes over the training split
epochs = 1.0
lr = 1e-3
min_lr_ratio = 0.1         # cosine decays to lr * min_lr_ratio
warmup_frac = 0.01
betas = (0.9, 0.98)
weight_decay = 0.0
grad_clip = 1.0
# system
device = "auto"            # "cuda", "cpu" or "auto"
dtype = "auto"             # compute dtype: "bfloat16" on GPU, "float32" on CPU when "auto"
compile = False            # torch.compile each block
activation_checkpointing = False
seed = 1337
# output
out_dir = "out/distill"
export_dtype = "float32"   # dtype of the exported final model
log_every = 10
eval_every = 100
eval_batches = 8
ckpt_every = 200
keep_ckpts = 2
resume: bool | str = False  # True: continue from the last checkpoint; "auto": if there is one (preemptible jobs)
debug_kill_at_step = -1    # tests only: SIGKILL this process right after that step's optimizer update
debug_kill_in_save = -1    # tests only: SIGKILL mid-way through that step's checkpoint save
peak_flops = 989e12        # the accelerator's dense bf16 peak, for MFU (H100 SXM; H200 the same; MI300X 1307e12)
config = configure(globals())
require(config, micro_batch=(1, None), seq_len=(1, None), tokens_per_step=(1, None), max_steps=(-1, None),
        epochs=(0, None), lr=(0, None), min_lr_ratio=(0, 1), warmup_frac=(0, 1), weight_decay=(0, None),
        grad_clip=(0, None), log_every=(1, None), eval_every=(1, None), eval_batches=(1, None), ckpt_every=(1, None),
        keep_ckpts=(1, None), kl_chunk=(1, None), val_every=(2, None), calib_tokens=(1, None),
        calib_seq_len=(0, None), kl_weight=(0, None), ce_weight=(0, None), seed=(0, None))
# -----------------------------------------------------------------------------

# settings that must match a checkpoint to resume from it, and those a resumed run may change (with a warning)
MODEL_KEYS = ("init_from", "student_from", "model_config", *(f.name for f in fields(Conversion)), "calib_tokens",
              "calib_seq_len", "teacher", "kl_weight", "ce_weight", "loss_on", "ild", "sft_data", "tokenizer",
              "val_every", "seq_len", "tokens_per_step", "seed")
SCHEDULE_KEYS = ("max_steps", "epochs", "lr", "min_lr_ratio", "warmup_frac", "betas", "weight_decay", "grad_clip")

d = init_distributed(device)
torch.manual_seed(seed)
cdtype = resolve_dtype(dtype, d.device.type)
mp_dtype = cdtype if cdtype != torch.float32 else None  # FSDP2 mixed precision: fp32 master weights, bf16 compute

# --- pre-flight: every setting, the folders, the tokenizer against the models, the disk; before any work
teacher_from = teacher or init_from
export_torch_dtype = check_train_settings(betas, export_dtype)
if not ild and kl_weight == 0 and ce_weight == 0:
    raise BadInput("kl_weight=0 and ce_weight=0: the loss is 0 and nothing would train. Fix: kl_weight=1 (distil "
                   "from the teacher) or ce_weight=1 (next-token loss on the data)")
if (kl_weight > 0 or ild) and (teacher == "none" or teacher_from == "scratch"):
    raise BadInput(f"{'ild=True' if ild else 'kl_weight > 0'} needs a teacher: set teacher= to a model folder or "
                   "hub id")
converting = not student_from and init_from != "scratch" and conversion.converts()
if (conversion.head_size or conversion.engine) and not converting:  # both aim a conversion at an engine
    what = "head_size" if conversion.head_size else "engine"
    raise BadInput(f"{what} aims a conversion of the source's attention at an engine; the student here is not "
                   f"converted (student_from / scratch, or no kv_budget / ranks). Fix: drop {what}, or give kv_budget")
if not student_from and init_from != "scratch" and not converting and teacher_from == init_from and kl_weight > 0:
    raise BadInput("nothing to distil: with no MLA settings and no student_from, the student is an exact copy of "
                   f"its teacher {init_from}. Fix: give a config (e.g. config/tiny_kv8.py) or MLA settings "
                   "(--q_rank=... --kv_rank=...), or student_from=")
folders = {"student": student_from or (init_from if init_from != "scratch" else None),
           "teacher": teacher_from if teacher != "none" and teacher_from != "scratch" else None}
folders = {k: resolve_checkpoint(v) for k, v in folders.items() if v}
# outputs apart from inputs: a run moving its own student_from aside, or a cache inside a model folder, is refused
check_apart(out_dir, "out_dir", {**{f"{k} folder": v for k, v in folders.items()},
                                 **{f"sft_data[{i}]": s for i, s in enumerate(sft_data)}}, {"data_cache": data_cache})
check_apart(data_cache, "data_cache", {f"{k} folder": v for k, v in folders.items()})
configs = {k: read_model_config(v) for k, v in folders.items()}
calibrating = converting and conversion.calibrates()
stu_cfg = configs.get("student") or ModelConfig(**model_config)
if seq_len > stu_cfg.max_seq_len:  # before the conversion's checks, which would name calib_seq_len
    raise BadInput(f"seq_len={seq_len} is beyond the model's {stu_cfg.max_seq_len} positions "
                   "(max_position_embeddings). Fix: a seq_len <= that")
if converting:  # completed as the command lines complete it (head_size -> r_kv and d_r; unset ranks: full)
    conversion = conversion.checked(configs["student"], calib_tokens=calib_tokens if calibrating else None,
                                    calib_seq_len=calib_seq_len or seq_len)
if ild and "student" in configs and not converting:  # the layers ILD trains; converting: known after upcycling
    converted_layers(configs["student"], configs["teacher"])
if "teacher" in configs and configs["teacher"].vocab_size != stu_cfg.vocab_size:
    raise BadInput(f"teacher vocabulary {configs['teacher'].vocab_size} != student {stu_cfg.vocab_size}: "
                   "distillation compares distributions over the same tokens")
tok = Tokenizer.from_name(tokenizer, folders.get("student") or folders.get("teacher"))
if "student" not in folders and tok.vocab_size > stu_cfg.vocab_size:  # scratch: no folder to check against
    raise BadInput(f"tokenizer {tok.describe()} has more ids than model_config's vocab_size {stu_cfg.vocab_size}")
# the same tokenizer everywhere, compared by what it does (a teacher of the same vocabulary size is not enough)
tok_notes = [n for role, f in folders.items() if (n := check_tokenizer_for(tok, f, role))]
check_sources(sft_data)
if any(not s.endswith((".txt", ".txt.gz")) for s in sft_data):  # chat data: its template must render, now
    tok.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
per_micro = micro_batch * seq_len * d.world
if tokens_per_step % per_micro:
    raise BadInput(f"tokens_per_step={tokens_per_step} must be a multiple of micro_batch x seq_len x world = "
                   f"{micro_batch} x {seq_len} x {d.world} = {per_micro}")
accum = tokens_per_step // per_micro
# --- data, still pre-flight (before the out_dir is touched): rank 0 tokenises once into the cache, the others wait,
# then memory-map it; its log lines go to the run's log once that exists
data_notes = []
if d.master:
    build_cache(sft_data, tok, data_cache, val_every, log=lambda m: (print(m, flush=True), data_notes.append(m)))
barrier()
cache = build_cache(sft_data, tok, data_cache, val_every, log=lambda *a: None)
train_data = PackedData(cache, "train", seq_len, loss_on)
val_data = PackedData(cache, "val", seq_len, loss_on)
n_eval = min(eval_batches * micro_batch, val_data.n_seq)
if not train_data.has_targets() or int((val_data.get(range(n_eval))[1] != -100).sum()) == 0:
    which = "the train split" if not train_data.has_targets() else f"the held-out slice ({n_eval} sequences)"
    raise BadInput(f"{which} has no target token with loss_on={loss_on!r}: every reply falls outside the packed "
                   "sequences, or the data has none. Fix: loss_on='all', a longer seq_len, more eval_batches, or "
                   "data with assistant replies")
if calibrating:  # checked now, before any model is loaded
    PackedData(cache, "train", calib_seq_len or seq_len).check_sample(calib_tokens)
with torch.device("meta"):
    n_params_est = sum(p.numel() for p in Transformer(stu_cfg).parameters())
go_on = prepare_out_dir(out_dir, resume, d, "distill",
                        checkpoint_bytes(n_params_est, keep_ckpts,
                                         torch.empty((), dtype=export_torch_dtype).element_size()))
log = RunLog(out_dir, d, "distill")
log.print(f"world {d.world} on {d.device}, compute {cdtype}; tokenizer {tok.describe()}; settings: {config}")
for note in tok_notes:
    log.print(f"note: {note}")
for line in data_notes:
    log.print(line, shown=True)
if go_on:
    check_resume_config(resumable_checkpoint(out_dir), config, MODEL_KEYS, SCHEDULE_KEYS, log)

if max_steps < 0:
    max_steps = max(1, int(epochs * train_data.n_seq) // (micro_batch * accum * d.world))
warmup = max(1, int(warmup_frac * max_steps))
log.print(f"data: {train_data.n_seq} train / {val_data.n_seq} held-out sequences of {seq_len}; "
          f"{tokens_per_step} tokens per step = {accum} micro-batches x {micro_batch} x {seq_len} x {d.world} ranks; "
          f"{max_steps} steps")

# --- models
tmodel = None
if "teacher" in folders:
    tmodel = Transformer.from_pretrained(folders["teacher"], dtype=cdtype, device=d.device).eval().requires_grad_(False)
    shard(tmodel, d, shard_root=False)  # frozen: no optimizer state; its head stays whole for the chunked loss
if student_from:
    student = Transformer.from_pretrained(folders["student"], device=d.device)
elif init_from == "scratch":
    student = Transformer(ModelConfig(**model_config)).to(d.device)
else:
    source = Transformer.from_pretrained(folders["student"], device=d.device)
    if not converting:
        student = source  # no MLA settings: fine-tune the source as it is
    else:
        calib = None
        if calibrating:  # calibration: this run's own train data, the same on all ranks
            calib = PackedData(cache, "train", calib_seq_len or seq_len).sample(calib_tokens, seed)
            log.print(f"calibration: {calib.numel()} tokens ({len(calib)} train sequences, seed {seed})")
        student = upcycle(source, conversion, seed=seed, copy=False, calib=calib,
                          log=log.print if d.master else None)
    del source
kv_src = tmodel.kv_cache_elements_per_token() if tmodel is not None else None
kv_stu = student.kv_cache_elements_per_token()
n_params = sum(p.numel() for p in student.parameters())
log.print(f"student: {n_params:,} parameters, {len(student.config.mla_layers)}/{student.config.n_layers} MLA layers, "
          f"KV cache {kv_stu} numbers/token" + (f" = {100 * kv_stu / kv_src:.1f}% of the teacher's {kv_src}"
                                                if kv_src else ""))
ild_layers = converted_layers(student.config, tmodel.config) if ild else []
if ild:
    log.print(f"ILD: layers {ild_layers} ({', '.join(student.config.layer_type(i) for i in ild_layers)}), each on the "
              "teacher's hidden states")
cfg0 = [student.config]  # every rank built the student; GPU SVDs need not be bit-identical, so take rank 0's
dist.broadcast_object_list(cfg0, src=0)  # (its ranks too: a near-tie in a rank choice could go either way)
if cfg0[0] != student.config:
    student = Transformer(cfg0[0]).to(d.device)  # the weights come from rank 0 just below
with torch.no_grad():
    for t in student.state_dict().values():
        dist.broadcast(t, src=0)
student.train()
shard(student, d, param_dtype=mp_dtype, compile=compile, checkpointing=activation_checkpointing)
optimizer = make_optimizer(student, lr, betas, weight_decay)

start_step = resume_step(go_on, out_dir, student, optimizer, d, log)


def loss_on_batch(x, y, weight, with_teacher):
    """Student forward with the chunked loss; the teacher's hidden states come first, without gradients.
    -> (loss, stats [sum KL, sum CE, sum teacher CE, n tokens, sum ILD error])."""
    x, y, weight = x.to(d.device), y.to(d.device), weight.to(d.device)
    h_t = W_t = None
    if with_teacher:
        with torch.no_grad():
            h_t, W_t = tmodel.forward_hidden(x).flatten(0, 1), tmodel.lm_head.weight
    loss, stats = student(x, head_fn=lambda h, W: linear_kl(h.flatten(0, 1), W, h_t, W_t, y.flatten(),
                                                            weight.flatten(), kl_weight, ce_weight, kl_chunk))
    return loss, torch.cat([stats, stats.new_zeros(1)])


def ild_on_batch(x, y, weight):
    """ILD: the converted blocks on the teacher's residual stream; loss = sum_t w_t sum_i ||block_i(h_i) - h_i+1||."""
    x, y, weight = x.to(d.device), y.to(d.device), weight.to(d.device)
    with torch.no_grad():
        hs = tmodel.forward_hidden(x, layer_states=True)                     # [h_0 .. h_L], (B, T, d) each
    err = ild_errors(student(x, layer_inputs={i: hs[i] for i in ild_layers}), hs)  # (B, T)
    valid = (y != -100).to(err.dtype)
    stats = torch.stack([*err.new_zeros(3), valid.sum(), (err.detach() * valid).sum()])
    return (err * weight).sum(), stats


@torch.no_grad()
def evaluate():
    """Held-out per-token KL(teacher || student), student CE and teacher CE, over eval_batches batches (and with
    ild, the ILD error per token)."""
    student.eval()
    stats = torch.zeros(5, device=d.device)
    # the same eval_batches x micro_batch sequences whatever the number of processes
    for ids, real in eval_chunks(min(eval_batches * micro_batch, val_data.n_seq), micro_batch, d):
        x, y = val_data.get(ids)
        stats += loss_on_batch(x, y, (y != -100).float(), tmodel is not None)[1] * float(real)
        if ild:
            stats[4] += ild_on_batch(x, y, (y != -100).float())[1][4] * float(real)
    dist.all_reduce(stats)
    student.train()
    kl, ce, tce, ntok, ild_err = stats.tolist()
    return {"kl": kl / ntok, "student_ce": ce / ntok, "teacher_ce": tce / ntok if tmodel is not None else None,
            **({"ild": ild_err / ntok} if ild else {})}


def fmt(ev):
    if ev["teacher_ce"] is None:  # no teacher: CE only
        return f"loss {ev['student_ce']:.4f}"
    return ((f"ILD {ev['ild']:.4f}  " if ild else "")
            + f"KL {ev['kl']:.4f}  student loss {ev['student_ce']:.4f}  teacher loss {ev['teacher_ce']:.4f}")


flops_per_token = 6 * n_params + (2 * sum(p.numel() for p in tmodel.parameters()) if kl_weight > 0 else 0)


def report(stats, seconds, steps):
    """The text and numbers of an interval: stats summed over ranks and its steps ({} when none had a target)."""
    kl, ce, _, ntok, ild_err = stats.tolist()
    if ntok == 0:  # every step of the interval was skipped (no target token): nothing to report
        return "", {}
    tok_s = steps * tokens_per_step / seconds
    if ild:
        return f"ILD {ild_err / ntok:.4f}  {tok_s:,.0f} tok/s", dict(loss=ild_err / ntok, ild=ild_err / ntok,
                                                                     tokens_per_s=tok_s)
    text = (f"loss {(kl_weight * kl + ce_weight * ce) / ntok:.4f}  "
            + (f"KL {kl / ntok:.4f}  CE {ce / ntok:.4f}" if kl_weight > 0 else f"CE {ce / ntok:.4f}")
            + f"  {tok_s:,.0f} tok/s")
    if d.device.type == "cuda":  # model FLOPs utilisation: 6 N per token for the student, 2 N for the teacher
        text += f"  MFU {100 * flops_per_token * tok_s / (d.world * peak_flops):.1f}%"
    return text, dict(loss=(kl_weight * kl + ce_weight * ce) / ntok, kl=kl / ntok, ce=ce / ntok, tokens_per_s=tok_s)


ev0 = evaluate()
log.print(f"held-out at step {start_step}: {fmt(ev0)}")
log.record("eval", step=start_step, **ev0)

# --- the loop. Per step: the learning rate, accum micro-batches per rank (their gradients reduce-scattered once, on
# the last), clipping, the update. Per interval: one host sync to log, a held-out evaluation, an atomic checkpoint.
# Non-finite numbers stop the run before anything is saved, so the last checkpoint is always a good one.
stats = torch.zeros(5, device=d.device)  # [KL, CE, teacher CE, target tokens, ILD error], summed until logged
loss = grad_norm = torch.zeros((), device=d.device)
t_last, since = time.time(), 0
stop = StopRequest()  # SIGINT / SIGTERM: stop after this step, with a checkpoint
for step in range(start_step, max_steps):
    lr_now = lr_at(step, lr, max_steps, warmup, lr * min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr_now
    batches = [train_data.get(train_data.batch_indices(step, m, d.rank, d.world, micro_batch, accum, seed))
               for m in range(accum)]  # this rank's micro-batches: (x, y) of (micro_batch, seq_len) each
    n_tok = host_sum(sum(int((y != -100).sum()) for _, y in batches))  # the step's targets (CPU tensors: no GPU sync)
    if n_tok == 0:  # loss_on="assistant" and no reply in the whole step (long prompts): nothing to learn
        log.print(f"step {step + 1}/{max_steps}: no target token in this step's batches; skipped (no update)")
        log.record("skipped", step=step + 1)
    else:
        for m, (x, y) in enumerate(batches):
            student.set_requires_gradient_sync(m == accum - 1)  # FSDP: reduce-scatter once per step, not per micro
            weight = (y != -100).float() * (d.world / n_tok)  # the step's mean (x world: FSDP averages over ranks)
            loss, s = ild_on_batch(x, y, weight) if ild else loss_on_batch(x, y, weight, kl_weight > 0)
            loss.backward()
            stats += s
        # grad_clip 0: no clipping, as in nanoGPT (the norm is still measured and logged)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    since, done = since + 1, step + 1
    if done == debug_kill_at_step:  # tests: a crash right after an update, before its checkpoint
        debug_kill()
    if done % log_every == 0 or done == max_steps:
        dist.all_reduce(stats)
        dt = time.time() - t_last
        text, numbers = report(stats, dt, since)  # the one host sync per interval happens in here
        if numbers:  # {}: every step of the interval was skipped, nothing to report
            numbers.update(lr=lr_now, grad_norm=grad_norm.item(), peak_mem_gib=peak_memory_gib(d.device))
            check_finite(done, numbers, out_dir, log)
            log.print(step_line(done, max_steps, text, numbers, dt, since))
            log.record("train", step=done, **numbers)
        stats.zero_()
        t_last, since = time.time(), 0
    if done % eval_every == 0 and done != max_steps:
        ev = evaluate()
        log.print(f"held-out at step {done}: {fmt(ev)}")
        log.record("eval", step=done, **ev)
    stopping = stop.agreed(d) and done != max_steps
    if done % ckpt_every == 0 or done == max_steps or stopping:
        check_finite(done, {"loss": loss.item(), "grad_norm": grad_norm.item()}, out_dir, log)
        path = save_checkpoint(out_dir, done, student, optimizer, {"config": config}, d, keep_ckpts,
                               debug_kill if done == debug_kill_in_save else None)
        log.print(f"checkpoint {path}")
    if stopping:
        stop.exit(d, done, max_steps, log)  # the command that resumes, then exit 128 + the signal
stop.restore()

# --- the end: held-out numbers beside the start's, and the exported model
ev = evaluate()
log.record("eval", step=max_steps, **ev)
log.print(f"held-out at {'init' if start_step == 0 else f'step {start_step} (resumed there)'}: {fmt(ev0)}")
log.print(f"held-out at end  : {fmt(ev)}")
if kv_src:
    log.print(f"KV cache: {kv_stu} vs {kv_src} numbers per token ({100 * kv_stu / kv_src:.1f}% of the teacher's, "
              f"{kv_src / kv_stu:.1f}x smaller)")
final = os.path.join(out_dir, "final")
export_model(student, final, d, run_config=config, dtype=export_torch_dtype, tokenizer=tok)
log.print(f"exported {final} (load with Transformer.from_pretrained)")
finish()
