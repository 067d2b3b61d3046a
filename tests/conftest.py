"""Shared test settings: offline hubs (a hub id must fail fast, never hang), deterministic CPU torch."""
import json
import os
import re
import subprocess
import sys
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from model import ModelConfig, Transformer  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
STORIES = os.path.join(FIXTURES, "stories260K")


def tiny_config(**kw):
    """A small GQA Llama (d 64, 4 layers, 8 heads, 4 KV heads of 16 dims); MLA/hybrid via kw."""
    base = dict(vocab_size=96, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=16, intermediate_size=128,
                max_seq_len=64, rope_theta=10000.0, tie_embeddings=True, bos_id=1, eos_id=(2,))
    base.update(kw)
    return ModelConfig(**base)


def mla_kw(layers, q_rank=24, kv_rank=12, d_qk=8, d_r=8, **kw):
    n = len(layers)
    q = q_rank if isinstance(q_rank, (list, tuple)) else [q_rank] * n
    kv = kv_rank if isinstance(kv_rank, (list, tuple)) else [kv_rank] * n
    return dict(mla_layers=tuple(layers), q_rank=tuple(q), kv_rank=tuple(kv), qk_nope_dim=d_qk, qk_rope_dim=d_r, **kw)


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    m = Transformer(cfg)
    # std 0.02 gives near-uniform logits in which a bug hides under the tolerance: use unit-scale activations
    # (std fan_in^-1/2), and perturb the RMSNorm weights (all 1 at init) so a norm in the wrong place would show
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "embed_tokens" in n else p.shape[1] ** -0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.fixture
def stories():
    return Transformer.from_pretrained(STORIES).eval()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def byte_teacher_and_sft(tmp):
    """tmp/teacher (a random tiny byte-level model, 128 positions) and tmp/sft.json (120 alpaca rows): the shared
    set-up of the tests that run the training scripts on bad input."""
    from tokenizer import Tokenizer
    random_model(tiny_config(vocab_size=512, bos_id=256, eos_id=(257,), max_seq_len=128)).save_pretrained(
        tmp / "teacher", tokenizer=Tokenizer.byte_level())
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"The number is {i}."} for i in range(120)]
    (tmp / "sft.json").write_text(json.dumps(rows))
    return tmp


def write_config(path, **settings):
    with open(path, "w") as f:
        f.write("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return str(path)


def run_script(script, cfg, nproc=1, extra=(), check=True):
    """python SCRIPT CFG (a world of one) or torchrun with nproc CPU processes; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    r = subprocess.run(launcher + [script, cfg, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    if check and nproc > 1 and _worker_signalled(r):
        # Seen once, in stop 42's CI (and never in 26 local repeats, 18 of them beside a CPU burner): a gloo worker of
        # torch 2.13 dying with SIGSEGV inside a CPU FSDP2 step of a run that is otherwise fine. One retry, announced; a second crash fails.
        warnings.warn(f"{script}: a worker was killed by a signal; retrying once\n{_fatal_stack(r)}")
        r = subprocess.run(launcher + [script, cfg, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)  # the same command: a fresh start moves the crashed run's files aside
    if check:
        assert r.returncode == 0, _fatal_stack(r) + r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _worker_signalled(r):
    return r.returncode != 0 and re.search(r"exitcode\s*:\s*-(11|6|7)\b", r.stderr) is not None


def _fatal_stack(r):
    """faulthandler's report of a worker that died in native code (trainer.init_distributed enables it): the
    Python stack where it happened, which the tail of stderr alone loses behind the launcher's traceback."""
    i = r.stderr.find("Fatal Python error")
    return r.stderr[i:i + 3000] + "\n...\n" if i >= 0 else ""


def read_log(out_dir, name, kind):
    with open(os.path.join(out_dir, f"{name}.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]
