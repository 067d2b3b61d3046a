"""The DeepSeek-V3 format (deepseek.py): exports load in transformers' DeepseekV3ForCausalLM with our logits, what the
format cannot hold is refused, DeepSeek-format folders (ours, DeepSeek-V2/V3-shaped, TransMLA-style) read back.
transformers is the reference here only: the project itself never imports it."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, mla_kw, random_model, tiny_config
from model import Transformer
from svd_init import teacher_text, upcycle

transformers = pytest.importorskip("transformers")

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
CASES = {  # name -> config; every layer MLA (the format has no GQA layers)
    "kv_norm_fused_query": tiny_config(**mla_kw(range(4), latent_norm="kv")),
    "both_norms_factorised_query": tiny_config(**mla_kw(range(4), latent_norm="both")),
    "per_layer_ranks_both_untied": tiny_config(**mla_kw(range(4), q_rank=[24, 16, 8, 20], kv_rank=[12, 6, 9, 12],
                                                       latent_norm="both"), tie_embeddings=False),
    "per_layer_ranks_kv": tiny_config(**mla_kw(range(4), kv_rank=[5, 12, 7, 10], latent_norm="kv")),
    "d_r_equals_d_h": tiny_config(**mla_kw(range(4), d_qk=16, d_r=16, latent_norm="kv")),
    "ladder_subset": tiny_config(**mla_kw(range(4), d_qk=16, d_r=4, latent_norm="kv"), qk_rope_theta=10000.0 ** 0.25),
    "llama3_scaling": tiny_config(**mla_kw(range(4), latent_norm="kv"), rope_theta=500000.0, rope_scaling=LLAMA3),
}


def moderate(m):
    """Logits of about 5 at most (random_model's reach ~50 tied, ~4 untied): an absolute fp32 tolerance then
    means the same thing in every case."""
    with torch.no_grad():
        m.model.norm.weight.mul_(5.0 / m(torch.arange(48)[None] % 96).abs().max())
    return m


def reference(folder, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def export(m, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.save_pretrained(folder, fmt="deepseek")
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("case", list(CASES))
def test_export_logits_equal_transformers(case, tmp_path):
    m = moderate(random_model(CASES[case]))
    said = export(m, tmp_path / "ds")
    assert any("YaRN" in w for w in said) == (case == "llama3_scaling")  # the serving caveat, only where it applies
    ref = reference(tmp_path / "ds")
    assert type(ref).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = m(ids), ref(ids).logits
    scale = ours.abs().max().item()
    assert 1.0 < scale < 20.0
    assert (ours - theirs).abs().max().item() <= 1e-4, case  # fp32 on CPU
    # and back: the same function again, from the DeepSeek folder alone
    back = Transformer.from_pretrained(tmp_path / "ds").eval()
    with torch.no_grad():
        assert (back(ids) - ours).abs().max().item() <= 1e-5 * scale


def test_exported_config_fields(tmp_path):
    cfg = CASES["per_layer_ranks_both_untied"]
    export(random_model(cfg), tmp_path / "ds")
    hf = json.load(open(tmp_path / "ds" / "config.json"))
    assert hf["architectures"] == ["DeepseekV3ForCausalLM"] and hf["model_type"] == "deepseek_v3"
    assert (hf["kv_lora_rank"], hf["q_lora_rank"]) == (12, 24)        # the largest ranks: others are padded
    assert (hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]) == (8, 8, 16)
    assert hf["num_key_value_heads"] == hf["num_attention_heads"] == 8
    assert hf["first_k_dense_replace"] == hf["num_hidden_layers"] == 4  # all MLPs dense
    assert all(isinstance(hf[k], int) for k in ("n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                                                "n_group", "topk_group", "moe_intermediate_size"))
    assert hf["num_nextn_predict_layers"] == 0 and hf["rope_interleave"] is True and hf["tie_word_embeddings"] is False
    assert hf["rms_norm_eps"] == cfg.norm_eps and hf["rope_theta"] == cfg.rope_theta and "rope_scaling" not in hf
    assert hf["mla_upcycle"]["kv_rank"] == [12, 6, 9, 12] and hf["mla_upcycle"]["head_dim"] == 16
    fused = json.load(open(_export_to(tmp_path / "f", CASES["kv_norm_fused_query"]) / "config.json"))
    assert fused["q_lora_rank"] is None and fused["mla_upcycle"]["q_fused"] is True
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ds" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" in keys  # engines never tie: the head is written even for a tied model
        assert f.get_tensor("model.layers.1.self_attn.kv_a_proj_with_mqa.weight").shape == (12 + 8, 64)
        kv_b = f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight")
        assert kv_b.shape == (8 * (8 + 16), 12) and not kv_b[:, 6:].any()        # layer 1 (r_kv 6): zero padding
        assert not f.get_tensor("model.layers.1.self_attn.kv_a_layernorm.weight")[6:].any()
    assert not any(".W_" in k or "q_norm" in k or "kv_norm" in k for k in keys)


def _export_to(folder, cfg):
    export(random_model(cfg), folder)
    return folder


def test_padding_compensates_the_rms_exactly_with_eps():
    """A layer of rank r padded to R: sqrt(ms_R(k c) + eps) = sqrt(ms_r(c) + eps) with k = sqrt(R/r), so the
    padded norm equals the unpadded one, eps included (float64, a latent with ms(c) near eps)."""
    import deepseek
    from model import RMSNorm
    torch.manual_seed(0)
    r, R, eps = 5, 12, 1e-6
    c = 1e-3 * torch.randn(7, r, dtype=torch.float64)          # ms(c) ~ 1e-6: eps matters here
    norm = RMSNorm(r, eps).double()
    norm.weight.data = torch.rand(r, dtype=torch.float64) + 0.5
    k = (R / r) ** 0.5
    padded = RMSNorm(R, eps).double()
    padded.weight.data = deepseek._pad_rows(norm.weight.data / k, R)
    out = padded(deepseek._pad_cols(c * k, R))
    assert torch.allclose(out[:, :r], norm(c), rtol=1e-13, atol=0) and not out[:, r:].any()
    naive = RMSNorm(R, eps).double()                           # padding without the compensation is not this
    naive.weight.data = deepseek._pad_rows(norm.weight.data, R)
    assert not torch.allclose(naive(deepseek._pad_cols(c, R))[:, :r], norm(c), rtol=1e-3)


def test_round_trip_is_exact(tmp_path):
    """ours -> DeepSeek -> ours: the same config and bit-identical tensors where no padding or fusing was needed
    (uniform ranks; a normed query; a full-rank query, W_DQ = I, as init="rorope" builds it). Padded layers come
    back to their own ranks (scaled and unscaled: equal to rounding)."""
    torch.manual_seed(0)
    both = random_model(CASES["both_norms_factorised_query"])
    eye = random_model(tiny_config(**mla_kw(range(4), q_rank=64, latent_norm="kv")))
    with torch.no_grad():
        for blk in eye.model.layers:
            blk.self_attn.W_DQ.weight.copy_(torch.eye(64))
    for name, m in (("both", both), ("eye", eye)):
        m.save_pretrained(tmp_path / name, fmt="deepseek")
        back = Transformer.from_pretrained(tmp_path / name)
        assert back.config == m.config, name
        sd = back.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items()), name
    padded = random_model(CASES["per_layer_ranks_both_untied"])
    padded.save_pretrained(tmp_path / "padded", fmt="deepseek")
    back = Transformer.from_pretrained(tmp_path / "padded")
    assert back.config == padded.config
    for k, v in padded.state_dict().items():
        assert torch.allclose(back.state_dict()[k], v, rtol=1e-6, atol=0), k
    # and a saved round-tripped model is this project's own folder again
    back.save_pretrained(tmp_path / "ours")
    assert json.load(open(tmp_path / "ours" / "config.json"))["model_type"] == "llama_mla"


def test_an_upcycled_model_exports(stories, tmp_path):
    """The real thing at tiny scale: stories260K upcycled by rorope at half the cache with a calibrated c_kv norm,
    exported, served by transformers' DeepseekV3 with our logits, and read back bit for bit."""
    calib = teacher_text(stories, 8, 128, seed=1)
    student = upcycle(stories, init="rorope", kv_budget=0.5, calib=calib, latent_norm="kv").eval()
    student.save_pretrained(tmp_path / "ds", fmt="deepseek")
    ids = teacher_text(stories, 2, 64, seed=2)
    with torch.no_grad():
        ours, theirs = student(ids), reference(tmp_path / "ds")(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5 * ours.abs().max().item()
    back = Transformer.from_pretrained(tmp_path / "ds")
    assert back.config == student.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("what", ["hybrid", "no_latent_norm", "other_eps"])
def test_refusals(what, tmp_path):
    cfg = {"hybrid": tiny_config(**mla_kw([0, 2], latent_norm="kv")),
           "no_latent_norm": tiny_config(**mla_kw(range(4))),
           "other_eps": tiny_config(**mla_kw(range(4), latent_norm="kv", latent_norm_eps=1e-5))}[what]
    reason = {"hybrid": r"layers \[1, 3\] are GQA", "no_latent_norm": "no RMSNorm on c_kv",
              "other_eps": "eps 1e-05"}[what]
    with pytest.raises(ValueError, match=reason):
        random_model(cfg).save_pretrained(tmp_path / "ds", fmt="deepseek")
    assert not os.path.exists(tmp_path / "ds")  # refused before anything was written


def _hf_deepseek(tmp_path, name, cls="DeepseekV3", **kw):
    """A random transformers DeepSeek model with dense MLPs, saved by transformers itself."""
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64, first_k_dense_replace=3,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    base.update(kw)
    config = getattr(transformers, cls + "Config")(**base)
    torch.manual_seed(0)
    ref = getattr(transformers, cls + "ForCausalLM")(config).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.normal_(0.0, 1.0 if "embed_tokens" in n else p.shape[-1] ** -0.5) if p.dim() == 2 else p.add_(
                0.1 * torch.randn_like(p))
        ref.model.norm.weight.mul_(0.1)
    ref.save_pretrained(tmp_path / name)
    return ref, tmp_path / name


@pytest.mark.parametrize("kind", ["v3_factorised_query", "v3_rotate_half", "v2_lite_shaped"])
def test_import_transformers_deepseek_folders(kind, tmp_path):
    kw = {"v3_factorised_query": dict(q_lora_rank=24),
          "v3_rotate_half": dict(rope_interleave=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
          "v2_lite_shaped": dict(cls="DeepseekV2", first_k_dense_replace=3)}[kind]
    ref, folder = _hf_deepseek(tmp_path, kind, **kw)
    ours = Transformer.from_pretrained(folder).eval()
    assert ours.config.mla_layers == (0, 1, 2) and ours.config.latent_norm == ("both" if "factorised" in kind else "kv")
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    # our fast decode runs on it too: prefill + latent decode steps equal the full forward
    with torch.no_grad():
        out = ours.generate(ids[:1, :8], 6)
        full = ours(out)[0, 7:-1].argmax(-1)
    assert torch.equal(out[0, 8:], full)


def test_import_transmla_style_folder(tmp_path):
    """TransMLA's --deepseek-style export: model_type deepseek_v3 on a Llama config, no expert fields, and with
    qk_latent_layernorm false no latent norms at all (what stock engines then compute differently)."""
    ref, folder = _hf_deepseek(tmp_path, "hf")
    for blk in ref.model.layers:  # the reference TransMLA's own modeling code computes: no kv_a_layernorm
        blk.self_attn.kv_a_layernorm = torch.nn.Identity()
    sd = {k: v for k, v in ref.state_dict().items() if "layernorm" not in k or "self_attn" not in k}
    hf = json.load(open(folder / "config.json"))
    for k in ("first_k_dense_replace", "n_routed_experts", "n_group", "topk_group", "num_experts_per_tok"):
        hf.pop(k, None)
    hf.update(qk_latent_layernorm=False, use_qk_head_norm=False)
    os.makedirs(tmp_path / "transmla")
    json.dump(hf, open(tmp_path / "transmla" / "config.json", "w"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "transmla" / "model.safetensors"))
    ours = Transformer.from_pretrained(tmp_path / "transmla").eval()
    assert ours.config.latent_norm == "none"
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="no RMSNorm on c_kv"):  # and it is not re-exported as if it had norms
        ours.save_pretrained(tmp_path / "again", fmt="deepseek")


def test_import_refusals(tmp_path):
    _, folder = _hf_deepseek(tmp_path, "moe", first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                             n_group=1, topk_group=1)
    with pytest.raises(ValueError, match="MoE layers"):
        Transformer.from_pretrained(folder)
    hf = json.load(open(folder / "config.json"))
    hf.update(first_k_dense_replace=3, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                        "original_max_position_embeddings": 16})
    json.dump(hf, open(folder / "config.json", "w"))
    with pytest.raises(ValueError, match="YaRN is not"):
        Transformer.from_pretrained(folder)


def test_command_line(tmp_path):
    """python deepseek.py MODEL OUT --check=True exports and prints the transformers comparison; a model the format
    cannot hold is refused with the reason, and nothing is written."""
    good = random_model(CASES["kv_norm_fused_query"])
    good.save_pretrained(tmp_path / "good")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "deepseek.py", str(tmp_path / "good"), str(tmp_path / "out"), "--check=True"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DeepseekV3ForCausalLM" in r.stdout and "max |logit difference|" in r.stdout
    err = float(r.stdout.split("max |logit difference|")[1].split()[0])
    assert err < 1e-3
    assert json.load(open(tmp_path / "out" / "config.json"))["model_type"] == "deepseek_v3"
    random_model(tiny_config(**mla_kw(range(4)))).save_pretrained(tmp_path / "bare")
    r = subprocess.run([sys.executable, "deepseek.py", str(tmp_path / "bare"), str(tmp_path / "out2")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no RMSNorm on c_kv" in r.stderr and not os.path.exists(tmp_path / "out2")
