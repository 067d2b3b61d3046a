"""distill.py end to end on tiny models: one process vs two (gloo, FSDP2) agree; a run killed with SIGKILL and
resumed reaches the same weights as an uninterrupted one; a checkpoint killed mid-write is never picked up."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from conftest import random_model, read_log, run_script, tiny_config, write_config
from model import Transformer
from trainer import latest_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    # a GQA teacher over the byte-level vocabulary, and a small chat file
    random_model(tiny_config(vocab_size=512, bos_id=256, eos_id=(257,), max_seq_len=128)).save_pretrained(tmp / "teacher")
    rows = [{"instruction": f"Say the number {i} in words.", "input": "", "output": f"The number is {i}, twice {2 * i}."}
            for i in range(120)]
    (tmp / "sft.json").write_text(json.dumps(rows))
    return tmp


def write_cfg(setup, name, **over):
    cfg = dict(init_from=str(setup / "teacher"), q_rank=32, kv_rank=8, qk_nope_dim=8, qk_rope_dim=8,
               sft_data=[str(setup / "sft.json")], tokenizer="bytes", data_cache=str(setup / "cache"), val_every=10,
               seq_len=32, micro_batch=2, tokens_per_step=128, max_steps=6, lr=3e-3, warmup_frac=0.2, kl_chunk=24,
               log_every=1, eval_every=100, eval_batches=2, ckpt_every=2, out_dir=str(setup / name))
    cfg.update(over)
    return write_config(setup / f"{name}.py", **cfg), cfg["out_dir"]


def run(cfg, nproc=1, extra=(), check=True):
    return run_script("distill.py", cfg, nproc, extra, check)


def train_log(out_dir):
    return read_log(out_dir, "distill", "train")


def weights(out_dir):
    return load_file(os.path.join(out_dir, "final", "model.safetensors"))


def test_one_vs_two_processes(setup):
    cfg, out1 = write_cfg(setup, "w1", max_steps=3)
    r = run(cfg, 1)
    assert "held-out at end" in r.stdout and "KV cache" in r.stdout
    cfg2, out2 = write_cfg(setup, "w2", max_steps=3)
    run(cfg2, 2)
    l1, l2 = train_log(out1), train_log(out2)
    assert [x["step"] for x in l1] == [1, 2, 3] and len(l2) == 3
    for a, b in zip(l1, l2):
        assert abs(a["kl"] - b["kl"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    e1, e2 = read_log(out1, "distill", "eval"), read_log(out2, "distill", "eval")
    assert len(e1) == len(e2) >= 2                  # held-out numbers: the same sequences whatever the world size
    for a, b in zip(e1, e2):
        assert abs(a["kl"] - b["kl"]) < 1e-5 * max(1.0, a["kl"]) and a["teacher_ce"] == pytest.approx(b["teacher_ce"])
    w1, w2 = weights(out1), weights(out2)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


def test_kill_and_resume_matches_uninterrupted(setup):
    ref_cfg, ref_out = write_cfg(setup, "ref")
    run(ref_cfg)
    evals = read_log(ref_out, "distill", "eval")
    assert evals[-1]["kl"] < evals[0]["kl"]                          # training lowers the held-out KL
    cfg, out = write_cfg(setup, "killed")
    r = run(cfg, extra=["--debug_kill_at_step=5"], check=False)
    assert r.returncode == -signal.SIGKILL
    assert latest_checkpoint(out).endswith("ckpt-0000004")          # steps 5.. are lost, 4 is the last good one
    r = run(cfg, extra=["--resume=True"])
    assert "resume:" in r.stdout and "(step 4)" in r.stdout
    a, b = weights(ref_out), weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k                            # bit-identical on CPU
    assert [x["loss"] for x in train_log(ref_out)][-2:] == [x["loss"] for x in train_log(out)][-2:]


def test_checkpoint_killed_mid_write_is_never_used(setup):
    ref_out = os.path.join(setup, "ref")
    if not os.path.exists(os.path.join(ref_out, "final")):
        run(write_cfg(setup, "ref")[0])
    cfg, out = write_cfg(setup, "torn")
    r = run(cfg, extra=["--debug_kill_in_save=4"], check=False)
    assert r.returncode == -signal.SIGKILL
    assert os.path.isdir(os.path.join(out, "ckpt-0000004.tmp"))     # the torn one is there ...
    assert latest_checkpoint(out).endswith("ckpt-0000002")          # ... and not picked
    run(cfg, extra=["--resume=True"])
    a, b = weights(ref_out), weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not os.path.exists(os.path.join(out, "ckpt-0000004.tmp"))


def test_bad_batch_settings(setup):
    cfg, _ = write_cfg(setup, "bad", tokens_per_step=100)
    r = run(cfg, check=False)
    assert r.returncode != 0 and "must be a multiple of micro_batch x seq_len x world" in r.stderr


def test_non_finite_loss_stops_without_saving(setup):
    bad = random_model(tiny_config(vocab_size=512, bos_id=256, eos_id=(257,), max_seq_len=128))
    with torch.no_grad():
        bad.model.norm.weight[0] = float("nan")                     # the teacher's distribution becomes NaN
    bad.save_pretrained(setup / "nan_teacher")
    cfg, out = write_cfg(setup, "nan", teacher=str(setup / "nan_teacher"))
    r = run(cfg, check=False)
    assert r.returncode == 1 and "non-finite loss or gradient norm" in r.stdout
    assert latest_checkpoint(out) is None and not os.path.exists(os.path.join(out, "final"))


def test_lr_schedule():
    from trainer import lr_at
    lrs = [lr_at(s, 1.0, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0                          # linear warmup over 10 steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))           # then non-increasing (cosine)
    assert abs(lr_at(55, 1.0, 100, 10, 0.1) - 0.55) < 1e-9          # halfway: the mean of max and min
    assert lr_at(100, 1.0, 100, 10, 0.1) == 0.1 and lr_at(500, 1.0, 100, 10, 0.1) == 0.1


def test_a_fresh_run_moves_an_earlier_one_aside(setup):
    cfg, out = write_cfg(setup, "rerun", max_steps=4)
    run(cfg)
    r = run(cfg, extra=["--max_steps=2"])                            # the same out_dir, no --resume
    assert "held an earlier run: moved" in r.stdout
    assert sorted(c for c in os.listdir(out) if c.startswith("ckpt-")) == ["ckpt-0000002"]   # no stale ckpt-4
    moved = [n for n in os.listdir(out) if n.startswith("replaced-")]
    assert len(moved) == 1 and "ckpt-0000004" in os.listdir(os.path.join(out, moved[0]))
    assert latest_checkpoint(out).endswith("ckpt-0000002")


def test_a_hugging_face_tokenizer_and_its_chat_template_end_to_end(setup):
    """A teacher folder with a tokenizer.json and a ChatML template: the data is rendered with that template, the
    student is distilled, and the exported folder carries the same tokenizer."""
    from conftest import FIXTURES
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(os.path.join(FIXTURES, "tokenizers", "bytebpe"))
    m = random_model(tiny_config(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=(tok.eos_id,), max_seq_len=128))
    m.save_pretrained(setup / "hf_teacher", tokenizer=tok)
    cfg, out = write_cfg(setup, "hf", init_from=str(setup / "hf_teacher"), tokenizer="", max_steps=2,
                         data_cache=str(setup / "hf_cache"))
    r = run(cfg)
    assert "tokenizer hf_teacher (700 ids" in r.stdout
    final = Tokenizer.from_pretrained(os.path.join(out, "final"))
    assert final.fingerprint() == tok.fingerprint() and os.path.exists(os.path.join(out, "final", "tokenizer.json"))
    meta = json.load(open(os.path.join(setup, "hf_cache", os.listdir(setup / "hf_cache")[0], "meta.json")))
    assert meta["tokenizer_fingerprint"] == tok.fingerprint()
    ids = np.fromfile(os.path.join(setup, "hf_cache", os.listdir(setup / "hf_cache")[0], "train.bin"), dtype=np.uint16)
    assert tok.decode(ids[:40].tolist()).startswith("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>")


def test_rorope_init_under_a_budget_on_two_processes(setup):
    """init="rorope" calibrated on the run's own train data, kv_budget: both ranks end with rank 0's student, the
    cache within the budget, the calibration settings recorded with the export."""
    cfg, out = write_cfg(setup, "ror", init="rorope", q_rank=None, kv_rank=None, qk_nope_dim=None, qk_rope_dim=None,
                         kv_budget=0.25, calib_tokens=256, max_steps=2)
    r = run(cfg, 2)
    assert "calibration: 256 tokens (8 train sequences" in r.stdout and "KL on the calibration tokens" in r.stdout
    m = Transformer.from_pretrained(os.path.join(out, "final"))
    teacher = Transformer.from_pretrained(str(setup / "teacher"))
    assert m.config.qk_nope_dim == 16 and m.kv_cache_elements_per_token() <= teacher.kv_cache_elements_per_token() // 4
    rc = json.load(open(os.path.join(out, "final", "run_config.json")))
    assert rc["init"] == "rorope" and rc["kv_budget"] == 0.25 and rc["calib_tokens"] == 256
    bad, _ = write_cfg(setup, "ror_bad", init="rorope", q_rank=None, kv_rank=None, qk_nope_dim=None,
                       qk_rope_dim=None, kv_budget=0.25, calib_tokens=10**6, max_steps=2)
    r = run(bad, 1, check=False)
    assert r.returncode != 0 and "calibration needs" in r.stderr
