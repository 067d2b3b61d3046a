"""Zebra-Llama (zebra.py): the Mamba2-from-attention mapping is causal linear attention of the source's Q, K, V when
decay is off and dt = 1; placement and budgets; the ILD loss against a hand computation; ILD, the end-to-end KL and
DPO run on a hybrid through distill.py / dpo.py (one and two processes agree); bad input fails before any work."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import random_model, read_log, run_script, tiny_config, write_config
from model import Transformer
from zebra import (check_budget, compose, fit_gains, ild_errors, layer_sensitivity, mamba_from_attention, n_mla_for,
                   place, uniform_layers)


def test_init_with_decay_off_and_dt_one_is_causal_linear_attention():
    src = random_model(tiny_config()).double()
    m = mamba_from_attention(src, [1, 2], conv_init="identity").double()
    layer, attn = m.model.layers[1].mamba, src.model.layers[1].self_attn
    with torch.no_grad():                                  # decay off (A = 0), dt = 1, no skip
        layer.A_log.fill_(-math.inf)
        layer.in_proj.weight[-layer.H:] = 0
        layer.dt_bias.fill_(math.log(math.e - 1))          # softplus(log(e - 1)) = 1
        layer.D.zero_()
    u = torch.randn(2, 11, 64, dtype=torch.float64)
    H, n_kv, d_h = 8, 4, 16
    q = F.silu(attn.q_proj(u)).view(2, 11, H, d_h)
    k = F.silu(attn.k_proj(u)).view(2, 11, n_kv, d_h).repeat_interleave(H // n_kv, dim=2)  # GQA's repeat_kv
    v = F.silu(attn.v_proj(u)).view(2, 11, n_kv, d_h).repeat_interleave(H // n_kv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k)                      # no softmax, no scale, no RoPE
    y = torch.einsum("bhts,bshd->bthd", scores * torch.ones(11, 11, dtype=torch.float64).tril(), v)
    z = layer.in_proj(u)[..., :H * d_h].view(2, 11, H, d_h)
    g = y * F.silu(z)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + layer.norm_eps)   # RMSNorm per head (weight 1)
    assert_close(layer(u), attn.o_proj(g.flatten(2)), rtol=1e-10, atol=1e-10)


def test_init_copies_and_fresh_parameters():
    src = random_model(tiny_config())
    m = mamba_from_attention(src, [0, 3], conv_init="random", seed=3)
    assert m.config.mamba_layers == (0, 3) and m.config.layer_type(1) == "gqa"
    for i in (0, 3):
        mb, a = m.model.layers[i].mamba, src.model.layers[i].self_attn
        d_in, d_xb = 8 * 16, 4 * 16
        W = mb.in_proj.weight
        assert torch.equal(W[d_in:d_in + d_xb], a.v_proj.weight)               # [z, x, B, C, dt]: x <- W_V
        assert torch.equal(W[d_in + d_xb:d_in + 2 * d_xb], a.k_proj.weight)     # B <- W_K
        assert torch.equal(W[d_in + 2 * d_xb:2 * d_in + 2 * d_xb], a.q_proj.weight)  # C <- W_Q
        assert torch.equal(mb.out_proj.weight, a.o_proj.weight)
        dt = F.softplus(mb.dt_bias)
        assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 0.1 + 1e-7
        A = mb.A_log.exp()
        assert A.min() >= 1 and A.max() <= 16 and torch.equal(mb.D, torch.ones(8))
        for name in ("mlp.gate_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert torch.equal(m.state_dict()[f"model.layers.{i}.{name}"], src.state_dict()[f"model.layers.{i}.{name}"])
    assert torch.equal(m.model.layers[1].self_attn.q_proj.weight, src.model.layers[1].self_attn.q_proj.weight)
    ident = mamba_from_attention(src, [0]).model.layers[0].mamba.conv1d
    assert torch.equal(ident.weight[..., -1], torch.ones_like(ident.weight[..., -1])) and not ident.bias.any()
    with pytest.raises(ValueError, match="not GQA"):
        mamba_from_attention(m, [0])


def test_fitted_gains_are_the_per_channel_least_squares():
    """Each gain minimises sum_t (w_c g_c - a_c)^2 for its channel: moving any w_c either way costs."""
    src = random_model(tiny_config()).double()
    ids = torch.randint(0, 96, (4, 12))
    gains = fit_gains(src, [0, 1, 2, 3], ids, batch_size=2)
    seen = {}
    src.model.layers[1].self_attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    src.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("a", a[0]))
    src(ids)
    layer = mamba_from_attention(src, [1]).double().model.layers[1].mamba  # the same init (per-layer seeds)
    layer.out_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("g", a[0]))
    with torch.no_grad():
        layer(seen["x"])
    g, a = seen["g"].flatten(0, 1), seen["a"].flatten(0, 1)
    err = lambda w: ((w * g - a) ** 2).sum(0)                            # per channel
    w = gains[1].double()
    assert_close(w, (g * a).sum(0) / (g * g).sum(0), rtol=1e-5, atol=1e-7)
    for eps in (1e-2, -1e-2):
        assert (err(w + eps) > err(w)).all()
    fitted = mamba_from_attention(src, [1, 3], gains=gains)
    assert torch.equal(fitted.model.layers[3].mamba.norm_weight, gains[3].double())
    # with the gains, each layer alone is closer to the source than with the published ones
    x = torch.randint(0, 96, (2, 16))
    sens = layer_sensitivity(src, x, gains=gains)
    ones = layer_sensitivity(src, x)
    assert sum(sens.values()) < sum(ones.values())


def test_ild_errors_by_hand():
    teacher = random_model(tiny_config())
    student = compose(teacher, [0], init="svd", q_rank=24, kv_rank=12, qk_rope_dim=8, qk_nope_dim=8)
    assert student.config.mamba_layers == (1, 2, 3) and student.config.mla_layers == (0,)
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        hs = teacher.forward_hidden(x, layer_states=True)
        assert len(hs) == 5 and torch.equal(teacher.model.norm(hs[-1]), teacher.forward_hidden(x))
        outs = student(x, layer_inputs={i: hs[i] for i in range(4)})
        err = ild_errors(outs, hs)
        # by hand: per token, the Euclidean distances summed over layers
        want = torch.zeros(2, 9)
        for i in range(4):
            for b in range(2):
                for t in range(9):
                    pairs = zip(outs[i][b, t].tolist(), hs[i + 1][b, t].tolist())
                    want[b, t] += math.sqrt(sum((a - c) ** 2 for a, c in pairs))
        assert_close(err, want, rtol=1e-5, atol=1e-5)
        # a layer equal to the teacher's gives exactly the teacher's next state: the teacher-forced path is the same
        same = teacher(x, layer_inputs={2: hs[2]})
        assert torch.equal(ild_errors(same, hs), torch.zeros(2, 9))


def test_placement_and_budgets():
    assert uniform_layers(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14] and uniform_layers(30, 4) == [0, 7, 15, 22]
    assert place({0: 0.5, 1: 2.0, 2: 0.1, 3: 2.0}, 2) == [1, 3]
    cfg = tiny_config()                                    # 4 layers x 2 n_kv d_h = 128 numbers per token each
    assert n_mla_for(cfg, mla_fraction=0.5) == 2 and n_mla_for(cfg, n_mla=1) == 1
    assert n_mla_for(cfg, cache_budget=0.25, mla_cache=40) == 3           # 128 numbers hold 3 layers of 40
    assert n_mla_for(cfg, cache_budget=100, mla_cache=40) == 2
    with pytest.raises(ValueError, match="does not hold one MLA layer"):
        n_mla_for(cfg, cache_budget=30, mla_cache=40)
    with pytest.raises(ValueError, match="not both"):
        n_mla_for(cfg, n_mla=1, cache_budget=0.5, mla_cache=40)
    check_budget(cfg, [0, 1], 40, 80)
    with pytest.raises(ValueError, match="over cache_budget"):
        check_budget(cfg, [0, 1, 2], 40, 100)
    m = random_model(cfg)
    sens = layer_sensitivity(m, torch.randint(0, 96, (2, 16)))
    assert sorted(sens) == [0, 1, 2, 3] and all(v > 0 for v in sens.values())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zebra")
    teacher = random_model(tiny_config(vocab_size=512, bos_id=256, eos_id=(257,), max_seq_len=128))
    teacher.save_pretrained(tmp / "teacher")
    rows = [{"instruction": f"Say the number {i} in words.", "input": "",
             "output": f"The number is {i}, twice {2 * i}."} for i in range(120)]
    (tmp / "sft.json").write_text(json.dumps(rows))
    pairs = [{"conversations": [{"from": "human", "value": f"Is {i} even?"}],
              "chosen": {"from": "gpt", "value": "yes" if i % 2 == 0 else "no"},
              "rejected": {"from": "gpt", "value": "no" if i % 2 == 0 else "yes"}} for i in range(40)]
    (tmp / "pairs.json").write_text(json.dumps(pairs))
    return tmp


def zebra_cfg(setup, name, **over):
    cfg = dict(init_from=str(setup / "teacher"), out_dir=str(setup / name), n_mla=1, mla_fraction=None, kv_rank=8,
               qk_rope_dim=8, calib_data=[str(setup / "sft.json")], calib_tokens=256, calib_seq_len=32,
               data_cache=str(setup / "cache"), tokenizer="bytes")
    cfg.update(over)
    return write_config(setup / f"{name}.py", **cfg)


def distill_cfg(setup, name, **over):
    cfg = dict(student_from=str(setup / "hybrid"), teacher=str(setup / "teacher"), sft_data=[str(setup / "sft.json")],
               tokenizer="bytes", data_cache=str(setup / "cache"), val_every=10, seq_len=32, micro_batch=2,
               tokens_per_step=128, max_steps=6, lr=3e-3, warmup_frac=0.2, log_every=1, eval_every=100,
               eval_batches=2, ckpt_every=100, out_dir=str(setup / name))
    cfg.update(over)
    return write_config(setup / f"{name}.py", **cfg)


def test_zebra_ild_kl_and_dpo_on_a_hybrid(setup):
    r = run_script("zebra.py", zebra_cfg(setup, "hybrid"))
    assert "layer sensitivity" in r.stdout and "saved" in r.stdout
    hf = json.loads((setup / "hybrid" / "config.json").read_text())
    assert len(hf["mla_layers"]) == 1 and len(hf["mamba_layers"]) == 3
    # ILD: one process and two agree; the ILD error and the held-out KL go down
    run_script("distill.py", distill_cfg(setup, "ild1", ild=True))
    run_script("distill.py", distill_cfg(setup, "ild2", ild=True), nproc=2)
    a, b = read_log(setup / "ild1", "distill", "train"), read_log(setup / "ild2", "distill", "train")
    for x, y in zip(a, b):
        assert abs(x["ild"] - y["ild"]) < 1e-4 * max(1.0, abs(x["ild"]))
    ev = read_log(setup / "ild1", "distill", "eval")
    assert ev[-1]["ild"] < ev[0]["ild"] and ev[-1]["kl"] < ev[0]["kl"]
    # then the end-to-end KL and DPO, unchanged, on the hybrid
    run_script("distill.py", distill_cfg(setup, "e2e", student_from=str(setup / "ild1" / "final"), lr=3e-4))
    ev2 = read_log(setup / "e2e", "distill", "eval")
    assert abs(ev2[0]["kl"] - ev[-1]["kl"]) < 1e-4 and ev2[-1]["kl"] < ev2[0]["kl"]
    dpo = write_config(setup / "dpo.py", init_from=str(setup / "e2e" / "final"), pref_data=[str(setup / "pairs.json")],
                       tokenizer="bytes", max_length=48, max_prompt_length=32, pairs_per_step=4, micro_batch=2,
                       max_steps=2, lr=1e-4, log_every=1, eval_every=100, eval_pairs=4, val_every=10, ckpt_every=100,
                       out_dir=str(setup / "dpo"))
    run_script("dpo.py", dpo)
    final = Transformer.from_pretrained(setup / "dpo" / "final")
    assert final.config.mamba_layers == tuple(hf["mamba_layers"])


def test_bad_input_fails_before_any_work(setup):
    cases = [(dict(mla_layers=[1, 1], n_mla=None), "distinct layer indices"),
             (dict(mla_layers=[0, 7], n_mla=None), "distinct layer indices"),
             (dict(mla_layers=[0, 1, 2], n_mla=None, cache_budget=30), "over cache_budget"),
             (dict(n_mla=None, cache_budget=10), "does not hold one MLA layer"),
             (dict(placement="random"), "placement")]
    for over, msg in cases:
        r = run_script("zebra.py", zebra_cfg(setup, "bad", **over), check=False)
        assert r.returncode != 0 and msg in r.stderr, (over, r.stderr[-600:])
        assert "calibration" not in r.stdout and not (setup / "bad").exists()
    bad = distill_cfg(setup, "badild", ild=True, student_from="", init_from=str(setup / "teacher"), teacher="none")
    r = run_script("distill.py", bad, check=False)
    assert r.returncode != 0 and "ild=True needs a teacher" in r.stderr
