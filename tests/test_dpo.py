"""dpo.py: the loss against a hand computation, response-only log-probs, truncation, preference row shapes, and
the script end to end (one vs two processes, kill and resume)."""
import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from conftest import random_model, read_log, run_script, tiny_config, write_config
from data import collate_pairs, to_pair, tokenize_pair
from ops import dpo_loss, reply_logps
from ops import linear_logprobs
from tokenizer import Tokenizer
from trainer import latest_checkpoint


def test_loss_and_rewards_by_hand():
    pc, pl = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rl = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    loss, cr, rr = dpo_loss(pc, pl, rc, rl, beta=0.5)
    # pair 0: chosen reward 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5, margin 1 -> -log sigmoid(1)
    # pair 1: chosen 0.5 * 1 = 0.5, rejected 0.5 * 2 = 1.0, margin -0.5 -> -log sigmoid(-0.5)
    assert_close(cr, torch.tensor([0.5, 0.5]))
    assert_close(rr, torch.tensor([-0.5, 1.0]))
    assert_close(loss, torch.tensor([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))]))
    same, _, _ = dpo_loss(pc, pl, pc, pl, beta=0.1)                  # policy = reference: log 2 whatever the data
    assert_close(same, torch.full((2,), math.log(2)))


def test_reply_logps_ignore_the_prompt():
    tok = Tokenizer.byte_level()
    pairs = [([1, 2, 3, 4], [5, 6, 7], [8, 9]), ([1, 2], [10, 11, 12, 13], [14])]
    x, y = collate_pairs(pairs, tok.pad_id)
    assert x.shape == (4, 6)
    assert y[0].tolist() == [-100, -100, -100, 5, 6, 7] and y[3].tolist() == [-100, 14, -100, -100, -100, -100]
    assert x[3].tolist() == [1, 2, tok.pad_id, tok.pad_id, tok.pad_id, tok.pad_id]
    torch.manual_seed(0)
    h, W = torch.randn(24, 8), torch.randn(16 + 256 + 256, 8)
    a = reply_logps(linear_logprobs(h, W, y.flatten()), y)
    h2 = h.clone().view(4, 6, 8)
    h2[y == -100] += 50.0                                            # change every prompt/padding position's logits
    b = reply_logps(linear_logprobs(h2.view(24, 8), W, y.flatten()), y)
    assert_close(a, b)
    h3 = h.clone().view(4, 6, 8)
    h3[0, 4] += 1.0                                                  # a reply position does count
    assert not torch.allclose(a[0], reply_logps(linear_logprobs(h3.view(24, 8), W, y.flatten()), y)[0])


def test_truncation_keeps_prompt_end_and_reply_start():
    tok = Tokenizer.byte_level()
    pair = ([{"role": "user", "content": "A" * 50 + "THE END"}], "B" * 40 + "tail", "C" * 40 + "tail")
    p, c, r = tokenize_pair(tok, pair, max_length=53, max_prompt_length=25)
    # BOS, then the last 24 tokens: "AAA" + "THE END" + the 14-token generation prompt (bytes: one token each)
    assert len(p) == 25 and p[0] == tok.bos_id
    assert tok.decode(p) == ("<|begin_of_text|>AAATHE END<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
                             "\n\n")
    assert len(p) + len(c) == 53 and tok.decode(c) == "B" * 28 and tok.decode(r) == "C" * 28
    assert tokenize_pair(tok, pair, 53, 25, long_prompts="drop") is None
    short = tokenize_pair(tok, ([{"role": "user", "content": "hi"}], "ok", "no"), 100, 50)
    assert tok.decode(short[1]) == "ok<|eot_id|>"                    # untruncated replies end with eot


def test_preference_row_shapes():
    conv = lambda a: [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": a}]
    assert to_pair({"prompt": "Q?", "chosen": conv("good"), "rejected": conv("bad")}) == (conv("")[:1], "good", "bad")
    hh = to_pair({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: sure",
                  "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: no"})
    assert hh[0][-1] == {"role": "user", "content": "help?"} and len(hh[0]) == 3 and hh[1:] == ("sure", "no")
    lf = to_pair({"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "a"},
                  "rejected": {"from": "gpt", "value": "b"}})
    assert lf == ([{"role": "user", "content": "Q?"}], "a", "b")
    orca = to_pair({"system": "S", "question": "Q?", "chosen": "a", "rejected": "b"})
    assert orca[0][0] == {"role": "system", "content": "S"}
    for bad in ({"prompt": "Q?", "chosen": conv("same"), "rejected": conv("same")},       # identical
                {"prompt": "Q?", "chosen": conv(" "), "rejected": conv("x")},             # empty reply
                {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},  # prompts differ
                {"chosen": conv("a"), "rejected": [{"role": "user", "content": "Z?"}, {"role": "assistant",
                                                                                       "content": "b"}]},
                {"foo": 1}, None):
        assert to_pair(bad) is None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    random_model(tiny_config(vocab_size=512, bos_id=256, eos_id=(257,), max_seq_len=128)).save_pretrained(tmp / "m")
    rows = [{"conversations": [{"from": "human", "value": f"Is {i} even?"}],
             "chosen": {"from": "gpt", "value": "yes" if i % 2 == 0 else "no"},
             "rejected": {"from": "gpt", "value": "no" if i % 2 == 0 else "yes"}} for i in range(80)]
    (tmp / "pairs.json").write_text(json.dumps(rows))
    return tmp


def write_cfg(setup, name, **over):
    cfg = dict(init_from=str(setup / "m"), pref_data=[str(setup / "pairs.json")], tokenizer="bytes", max_length=64,
               max_prompt_length=48, pairs_per_step=8, micro_batch=2, max_steps=6, lr=1e-3, beta=0.1, log_every=1,
               eval_every=100, eval_pairs=8, val_every=10, ckpt_every=2, logp_chunk=40, out_dir=str(setup / name))
    cfg.update(over)
    return write_config(setup / f"{name}.py", **cfg), cfg["out_dir"]


def final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def test_one_vs_two_processes_and_precomputed_reference(setup):
    cfg1, out1 = write_cfg(setup, "p1", max_steps=3)
    assert "held-out at end" in run_script("dpo.py", cfg1).stdout
    first = read_log(out1, "dpo", "eval")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6                 # policy = reference at the start
    cfg2, out2 = write_cfg(setup, "p2", max_steps=3)
    run_script("dpo.py", cfg2, nproc=2)
    cfg3, out3 = write_cfg(setup, "p3", max_steps=3, precompute_ref=True)
    r3 = run_script("dpo.py", cfg3)
    assert "reference log-probs of 72 pairs cached" in r3.stdout
    a, b, c = (read_log(o, "dpo", "train") for o in (out1, out2, out3))
    for x, y, z in zip(a, b, c):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["loss"] - z["loss"]) < 1e-5
        assert abs(x["reward_accuracy"] - y["reward_accuracy"]) < 1e-6
    w1, w2 = final_weights(out1), final_weights(out2)
    for k in w1:
        assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


def test_kill_and_resume(setup):
    ref_cfg, ref_out = write_cfg(setup, "ref")
    run_script("dpo.py", ref_cfg)
    cfg, out = write_cfg(setup, "killed")
    assert run_script("dpo.py", cfg, extra=["--debug_kill_at_step=5"], check=False).returncode == -signal.SIGKILL
    assert latest_checkpoint(out).endswith("ckpt-0000004")
    assert "(step 4)" in run_script("dpo.py", cfg, extra=["--resume=True"]).stdout
    a, b = final_weights(ref_out), final_weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
