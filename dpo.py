"""
Direct Preference Optimisation of the distilled MLA student (X-EcoMLA §4.2, stage 2), with the distilled model
itself as the frozen reference: minimise  -log sigmoid(beta [(log pi(y_w|x) - log pi_ref(y_w|x))
                                                              - (log pi(y_l|x) - log pi_ref(y_l|x))]).

    python dpo.py config/tiny_dpo.py                                              # CPU, a world of one
    torchrun --standalone --nproc_per_node=2 dpo.py config/tiny_dpo.py            # CPU, 2 processes
    torchrun --standalone --nproc_per_node=8 dpo.py config/llama1b_kv64_dpo.py    # one 8-GPU node
    python dpo.py config/tiny_dpo.py --resume=True

A top-to-bottom script with its own loop, the shape of distill.py's, on the same helpers (trainer.py: set-up,
FSDP2, schedule, checkpoints, logging). The loss and the reply log-probabilities are ops.dpo_loss / ops.reply_logps.
"""
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from configurator import configure, require
from data import batch_indices, check_sources, collate_pairs, load_pairs
from errors import BadInput
from ops import dpo_loss, linear_logprobs, reply_logps
from folders import check_apart, load_tensors, resolve_checkpoint, save_tensors
from model import Transformer, read_model_config, resolve_dtype
from tokenizer import Tokenizer, check_tokenizer_for
from trainer import (RunLog, StopRequest, check_finite, check_resume_config, check_train_settings, checkpoint_bytes,
                     debug_kill, eval_chunks, export_model, finish, init_distributed, lr_at, make_optimizer,
                     peak_memory_gib, prepare_out_dir, resumable_checkpoint, resume_step, save_checkpoint, shard,
                     step_line)

# -----------------------------------------------------------------------------
# settings
init_from = "out/tiny_kv8/final"   # the distilled student: the policy, and (frozen) the reference
ref_from = ""              # another reference model ("" = init_from, as the paper does)
pref_data = ["assets/data/dpo/hh_rlhf_harmless_base_test.jsonl.gz", "assets/data/dpo/llamafactory_dpo_en_demo.json"]
val_data = []              # held-out pairs; [] = every val_every-th pair of pref_data
val_every = 20
tokenizer = ""             # "" = the policy folder's own; or "bytes", "llama3", a folder, a tokenizer.model
max_length = 1024          # prompt + reply tokens
max_prompt_length = 512    # longer prompts keep BOS and their end
long_prompts = "truncate"  # or "drop"
beta = 0.01
precompute_ref = False     # compute the reference log-probs once, cache them in out_dir (halves the work)
logp_chunk = 1024          # tokens per chunk of the log-prob kernel
# optimisation (official: lr 5e-7, cosine, warmup 10%, 1 epoch)
pairs_per_step = 64        # global batch in preference pairs
micro_batch = 4            # pairs per micro-batch per process (2x sequences: chosen and rejected)
max_steps = -1
epochs = 1.0
lr = 5e-7
min_lr_ratio = 0.0
warmup_frac = 0.1
betas = (0.9, 0.98)
weight_decay = 0.0
grad_clip = 1.0
# system and output (as distill.py)
device = "auto"
dtype = "auto"
compile = False
activation_checkpointing = False
seed = 1337
out_dir = "out/dpo"
export_dtype = "float32"
log_every = 10
eval_every = 50
eval_pairs = 256           # held-out pairs per evaluation (all of them if fewer)
ckpt_every = 200
keep_ckpts = 2
resume: bool | str = False  # True: continue from the last checkpoint; "auto": if there is one
debug_kill_at_step = -1
debug_kill_in_save = -1
config = configure(globals())
require(config, val_every=(2, None), max_length=(2, None), max_prompt_length=(1, None), beta=(0, None),
        logp_chunk=(1, None), pairs_per_step=(1, None), micro_batch=(1, None), max_steps=(-1, None),
        epochs=(0, None), lr=(0, None), min_lr_ratio=(0, 1), warmup_frac=(0, 1), weight_decay=(0, None),
        grad_clip=(0, None), log_every=(1, None), eval_every=(1, None), eval_pairs=(1, None),
        ckpt_every=(1, None), keep_ckpts=(1, None), seed=(0, None))
if beta == 0:  # -log sigmoid(0) for every pair: a constant loss with zero gradient
    raise BadInput("beta=0: the DPO loss is then log 2 for every pair and nothing trains. Fix: beta > 0 (the "
                   "paper's 0.01; config/tiny_dpo.py uses 0.1)")
if max_prompt_length >= max_length:
    raise BadInput(f"max_prompt_length={max_prompt_length} >= max_length={max_length}: a prompt could fill the "
                   "whole sequence and leave no reply to score. Fix: max_prompt_length < max_length (e.g. half)")
if long_prompts not in ("truncate", "drop"):
    raise BadInput(f"long_prompts={long_prompts!r}: use 'truncate' or 'drop'")
export_torch_dtype = check_train_settings(betas, export_dtype)
# -----------------------------------------------------------------------------

MODEL_KEYS = ("init_from", "ref_from", "pref_data", "val_data", "val_every", "tokenizer", "max_length",
              "max_prompt_length", "long_prompts", "beta", "pairs_per_step", "seed")
SCHEDULE_KEYS = ("max_steps", "epochs", "lr", "min_lr_ratio", "warmup_frac", "betas", "weight_decay", "grad_clip")

d = init_distributed(device)
torch.manual_seed(seed)
cdtype = resolve_dtype(dtype, d.device.type)

# --- pre-flight: folders, the tokenizer against policy and reference, batch settings, the disk
folders = {"policy": resolve_checkpoint(init_from), "reference": resolve_checkpoint(ref_from or init_from)}
check_apart(out_dir, "out_dir", {**folders, **{f"pref_data[{i}]": p for i, p in enumerate(pref_data + val_data)}})
tok = Tokenizer.from_name(tokenizer, folders["policy"])
for role, folder in folders.items():
    check_tokenizer_for(tok, folder, role)
check_sources(pref_data + val_data)
tok.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])  # renders?
if pairs_per_step % (micro_batch * d.world):
    raise BadInput(f"pairs_per_step={pairs_per_step} must be a multiple of micro_batch x world = "
                   f"{micro_batch} x {d.world}")
# --- data, still pre-flight (the out_dir untouched): every rank tokenises the (small) preference sets the same
# way; rank 0 prints, and its lines go to the run's log once that exists
data_notes = []
quiet = (lambda m: (print(m, flush=True), data_notes.append(m))) if d.master else (lambda *a: None)
pairs, _ = load_pairs(pref_data, tok, max_length, max_prompt_length, long_prompts, log=quiet)
if val_data:
    val_pairs, _ = load_pairs(val_data, tok, max_length, max_prompt_length, long_prompts, log=quiet)
else:
    val_pairs = [p for i, p in enumerate(pairs) if i % val_every == val_every - 1]
    pairs = [p for i, p in enumerate(pairs) if i % val_every != val_every - 1]
val_pairs = val_pairs[:eval_pairs]
if not pairs or not val_pairs:
    raise BadInput(f"no {'training' if not pairs else 'held-out'} preference pair is left after the checks above "
                   "(see the data: lines). Fix: more or longer-limit data (max_length, max_prompt_length), or "
                   "val_data / val_every")
with torch.device("meta"):
    n_est = sum(p.numel() for p in Transformer(read_model_config(folders["policy"])).parameters())
go_on = prepare_out_dir(out_dir, resume, d, "dpo", checkpoint_bytes(n_est, keep_ckpts))
log = RunLog(out_dir, d, "dpo")
log.print(f"world {d.world} on {d.device}, compute {cdtype}; tokenizer {tok.describe()}; settings: {config}")
for line in data_notes:
    log.print(line, shown=True)
if go_on:
    check_resume_config(resumable_checkpoint(out_dir), config, MODEL_KEYS, SCHEDULE_KEYS, log)

accum = pairs_per_step // (micro_batch * d.world)
if max_steps < 0:
    max_steps = max(1, int(epochs * len(pairs)) // pairs_per_step)
warmup = max(1, int(warmup_frac * max_steps))
log.print(f"data: {len(pairs)} train / {len(val_pairs)} held-out pairs; {pairs_per_step} pairs per step = "
          f"{accum} x {micro_batch} x {d.world} ranks; {max_steps} steps")

# --- models: the policy (trained) and the reference (frozen, sharded, no optimizer state)
policy = Transformer.from_pretrained(folders["policy"], device=d.device)
# always loaded: it fills the precomputed cache and scores the held-out pairs
ref = Transformer.from_pretrained(folders["reference"], dtype=cdtype, device=d.device).eval().requires_grad_(False)
shard(ref, d, shard_root=False)
policy.train()
shard(policy, d, param_dtype=cdtype if cdtype != torch.float32 else None, compile=compile,
      checkpointing=activation_checkpointing)
optimizer = make_optimizer(policy, lr, betas, weight_decay)

def sequence_logps(model, x, y):
    """Summed reply log-probs of each sequence of (x, y), via the chunked kernel inside the model's forward."""
    x, y = x.to(d.device), y.to(d.device)
    return model(x, head_fn=lambda h, W: reply_logps(linear_logprobs(h.flatten(0, 1), W, y.flatten(),
                                                                     logp_chunk), y))

# --- optional: the reference's log-probs of every training pair, once (rank r does pairs r, r + world, ...)
ref_cache = None
if precompute_ref:
    # keyed by everything that decides the numbers, so a changed setting can never reuse a stale file
    key = hashlib.sha256(json.dumps([ref_from or init_from, pref_data, val_data, val_every, tok.fingerprint(), max_length,
                                     max_prompt_length, long_prompts, len(pairs)]).encode()).hexdigest()[:12]
    path = os.path.join(out_dir, f"ref_logps-{key}.safetensors")
    if os.path.exists(path):  # every rank reads the same file, so every rank decides alike
        try:
            ref_cache = load_tensors(path)["logps"].to(d.device)
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            log.print(f"WARNING: {path} cannot be used ({type(e).__name__}: {e}); computing it again")
    if ref_cache is None:
        local = torch.zeros(len(pairs), 2, device=d.device)
        with torch.no_grad():  # the same number of forwards on every rank (the reference is sharded)
            for ids, real in eval_chunks(len(pairs), micro_batch, d):
                x, y = collate_pairs([pairs[j] for j in ids], tok.pad_id)
                lp = sequence_logps(ref, x, y).float()
                if real:
                    local[ids] = torch.stack([lp[:len(ids)], lp[len(ids):]], 1)
        dist.all_reduce(local)   # each pair was computed by exactly one rank
        ref_cache = local
        if d.master:  # written beside and renamed: a crash never leaves a half file that a resume would read
            save_tensors({"logps": local.cpu()}, path + ".tmp")
            os.replace(path + ".tmp", path)
    log.print(f"reference log-probs of {len(pairs)} pairs cached in {path}")

start_step = resume_step(go_on, out_dir, policy, optimizer, d, log)

def pair_stats(batch, idx=None, scale=1.0, real=True):
    """Loss (scaled for the step) and stats [loss, accuracy, margin, chosen reward, rejected reward, pairs,
    tokens] summed over the pairs of `batch`."""
    x, y = collate_pairs(batch, tok.pad_id)
    B = len(batch)
    lp = sequence_logps(policy, x, y)
    if ref_cache is not None and idx is not None:
        r = ref_cache[idx]
        ref_c, ref_r = r[:, 0], r[:, 1]
    else:
        with torch.no_grad():
            r = sequence_logps(ref, x, y).float()
        ref_c, ref_r = r[:B], r[B:]
    loss, rc, rr = dpo_loss(lp[:B], lp[B:], ref_c, ref_r, beta)
    stats = torch.stack([loss.sum(), (rc > rr).float().sum(), (rc - rr).sum(), rc.sum(), rr.sum(),
                         torch.tensor(float(B), device=d.device),
                         (x != tok.pad_id).sum().float()]) * float(real)  # a padding batch counts 0
    return loss.sum() * scale, stats.detach()

def summary(stats):
    loss, acc, margin, rc, rr, n, ntok = stats.tolist()
    return dict(loss=loss / n, reward_accuracy=acc / n, reward_margin=margin / n, chosen_reward=rc / n,
                rejected_reward=rr / n), ntok

def fmt(s):
    return (f"loss {s['loss']:.4f}  reward acc {100 * s['reward_accuracy']:.1f}%  margin {s['reward_margin']:.4f}"
            f"  chosen {s['chosen_reward']:.4f}  rejected {s['rejected_reward']:.4f}")

def report(stats, seconds, steps):
    s, ntok = summary(stats)
    s["tokens_per_s"] = ntok / seconds
    return f"{fmt(s)}  {s['tokens_per_s']:,.0f} tok/s", s

@torch.no_grad()
def evaluate():
    policy.eval()
    stats = torch.zeros(7, device=d.device)
    for ids, real in eval_chunks(len(val_pairs), micro_batch, d):  # same pairs, same forwards on every rank
        stats += pair_stats([val_pairs[j] for j in ids], real=real)[1]
    dist.all_reduce(stats)
    policy.train()
    s = summary(stats)[0]
    return fmt(s), s

text0, ev0 = evaluate()
log.print(f"held-out at step {start_step}: {text0}")
log.record("eval", step=start_step, **ev0)

# --- the loop, as distill.py's: per step the learning rate, accum micro-batches of pairs per rank (gradients
# reduce-scattered once, on the last), clipping, the update; per interval a log line, an evaluation, a checkpoint
stats = torch.zeros(7, device=d.device)  # [loss, accuracy, margin, chosen, rejected, pairs, tokens], summed
loss = grad_norm = torch.zeros((), device=d.device)
t_last, since = time.time(), 0
stop = StopRequest()  # SIGINT / SIGTERM: stop after this step, with a checkpoint
for step in range(start_step, max_steps):
    lr_now = lr_at(step, lr, max_steps, warmup, lr * min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr_now
    for m in range(accum):
        idx = batch_indices(len(pairs), step, m, d.rank, d.world, micro_batch, accum, seed)
        policy.set_requires_gradient_sync(m == accum - 1)  # FSDP: reduce-scatter once per step
        # the step's mean over its pairs (x world: FSDP averages gradients over ranks)
        loss, s = pair_stats([pairs[i] for i in idx], torch.tensor(idx, device=d.device),
                             d.world / pairs_per_step)
        loss.backward()
        stats += s
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip or float("inf"))  # 0: no clipping
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    since, done = since + 1, step + 1
    if done == debug_kill_at_step:  # tests: a crash right after an update, before its checkpoint
        debug_kill()
    if done % log_every == 0 or done == max_steps:
        dist.all_reduce(stats)
        dt = time.time() - t_last
        text, numbers = report(stats, dt, since)  # the one host sync per interval
        numbers.update(lr=lr_now, grad_norm=grad_norm.item(), peak_mem_gib=peak_memory_gib(d.device))
        check_finite(done, numbers, out_dir, log)
        log.print(step_line(done, max_steps, text, numbers, dt, since))
        log.record("train", step=done, **numbers)
        stats.zero_()
        t_last, since = time.time(), 0
    if done % eval_every == 0 and done != max_steps:
        text, ev = evaluate()
        log.print(f"held-out at step {done}: {text}")
        log.record("eval", step=done, **ev)
    stopping = stop.agreed(d) and done != max_steps
    if done % ckpt_every == 0 or done == max_steps or stopping:
        check_finite(done, {"loss": loss.item(), "grad_norm": grad_norm.item()}, out_dir, log)
        path = save_checkpoint(out_dir, done, policy, optimizer, {"config": config}, d, keep_ckpts,
                               debug_kill if done == debug_kill_in_save else None)
        log.print(f"checkpoint {path}")
    if stopping:
        stop.exit(d, done, max_steps, log)  # the command that resumes, then exit 128 + the signal
stop.restore()

text, ev = evaluate()
log.record("eval", step=max_steps, **ev)
log.print(f"held-out at {'init' if start_step == 0 else f'step {start_step} (resumed there)'}: {text0}")
log.print(f"held-out at end  : {text}")
final = os.path.join(out_dir, "final")
export_model(policy, final, d, run_config=config, dtype=export_torch_dtype, tokenizer=tok)
log.print(f"exported {final}")
finish()
