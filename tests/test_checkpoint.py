"""Hugging Face folders in and out: a real pre-trained checkpoint, parity with transformers, round trips, errors."""
import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import STORIES, mla_kw, random_model, tiny_config
from model import Transformer

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball.")


def decode_tok512(ids):
    pieces = json.load(open(os.path.join(STORIES, "tokenizer_tok512.json")))["pieces"]
    return "".join(pieces[i][0] for i in ids).replace("\u2581", " ")


def test_stories260K_greedy_text(stories):
    """A real pre-trained GQA Llama: 60 greedy tokens from BOS reproduce its known story."""
    assert (stories.config.n_heads, stories.config.n_kv_heads, stories.config.head_dim) == (8, 4, 8)
    out = stories.generate(torch.tensor([[1]]), max_new_tokens=60)
    text = decode_tok512(out[0, 1:].tolist()).strip()
    assert text.startswith(STORY), text


def test_stories260K_matches_transformers(stories):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (stories(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_llama3_rope_untied_gqa_matches_transformers(tmp_path):
    """llama3 rope_scaling, untied head, GQA: our save -> transformers load -> same logits; and transformers' own
    save (its config.json format) -> our load -> same logits."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(tie_embeddings=False, max_seq_len=128, rope_theta=500000.0,
                      rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=32))
    ours = random_model(cfg)
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 120))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4
        hf.save_pretrained(tmp_path / "theirs")
        back = Transformer.from_pretrained(tmp_path / "theirs")
        assert back.config.rope_scaling["factor"] == 32.0 and not back.config.tie_embeddings
        assert (back(idx) - hf(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["gqa", "hybrid", "mla_norm"])
def test_round_trip(tmp_path, kind):
    cfg = {"gqa": tiny_config(),
           "hybrid": tiny_config(**mla_kw([0, 3], q_rank=[20, 30], kv_rank=[6, 9])),
           "mla_norm": tiny_config(**mla_kw(range(4), latent_norm=True), tie_embeddings=False)}[kind]
    m = random_model(cfg)
    m.save_pretrained(tmp_path / "ckpt", run_config={"lr": 1e-3})
    hf = json.load(open(tmp_path / "ckpt" / "config.json"))
    assert hf["model_type"] == ("llama" if kind == "gqa" else "llama_mla")
    assert json.load(open(tmp_path / "ckpt" / "run_config.json")) == {"lr": 1e-3}
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]          # the temporary folder is gone
    back = Transformer.from_pretrained(tmp_path / "ckpt")
    assert back.config == m.config
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    assert torch.equal(back(idx), m(idx))


def test_load_in_bf16_and_sharded(tmp_path):
    m = random_model(tiny_config(**mla_kw([1])))
    m.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    back = Transformer.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert back.lm_head.weight is back.model.embed_tokens.weight                   # tying survives assign=True
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16)), k


def test_save_replaces_existing_folder(tmp_path):
    a, b = random_model(tiny_config(), seed=0), random_model(tiny_config(), seed=1)
    a.save_pretrained(tmp_path / "c")
    b.save_pretrained(tmp_path / "c")
    assert torch.equal(Transformer.from_pretrained(tmp_path / "c").lm_head.weight, b.lm_head.weight)
    assert os.listdir(tmp_path) == ["c"]


def _copy_stories(tmp_path):
    d = tmp_path / "s"
    shutil.copytree(STORIES, d)
    return d, load_file(d / "model.safetensors")


def test_a_flipped_byte_inside_a_tensor_is_named(tmp_path):
    """safetensors' header has no checksum; ours carry a CRC-32 per tensor, so a damaged byte is named at load, in
    this project's folders and in its DeepSeek-V3 exports. Files without them (from elsewhere) load as before."""
    student = random_model(tiny_config(**mla_kw(range(4), latent_norm="kv")))
    student.save_pretrained(tmp_path / "ours")
    student.save_pretrained(tmp_path / "ds", fmt="deepseek")
    for folder in ("ours", "ds"):
        Transformer.from_pretrained(tmp_path / folder)  # intact: loads
        p = tmp_path / folder / "model.safetensors"
        data = bytearray(p.read_bytes())
        data[-3] ^= 0x01
        p.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=r"model.safetensors: the bytes of tensor \S+ differ from the checksum"):
            Transformer.from_pretrained(tmp_path / folder)
    sd = load_file(tmp_path / "ours" / "model.safetensors")
    save_file(sd, tmp_path / "ours" / "model.safetensors")  # no checksums: read as it is, as a hub download
    Transformer.from_pretrained(tmp_path / "ours")


def test_missing_tensor_is_named(tmp_path):
    d, sd = _copy_stories(tmp_path)
    sd.pop("model.layers.2.mlp.up_proj.weight")
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.2.mlp.up_proj.weight'\]"):
        Transformer.from_pretrained(d)


def test_misshaped_and_unexpected_tensors_are_named(tmp_path):
    d, sd = _copy_stories(tmp_path)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(d)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight: checkpoint (16, 64) vs model (32, 64)" in msg
    assert "unexpected tensors: ['model.layers.0.extra.weight']" in msg
    assert "missing" not in msg


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(open(os.path.join(STORIES, "config.json")).read())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        Transformer.from_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a Llama"):
        Transformer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a model folder"):
        Transformer.from_pretrained("./no/such/folder")


def test_hub_id_offline_fails_fast():
    """Hub ids go through huggingface_hub; offline (tests set HF_HUB_OFFLINE=1) it must fail in seconds."""
    t0 = time.time()
    with pytest.raises(Exception) as e:
        Transformer.from_pretrained("meta-llama/Llama-3.2-1B-Instruct")
    assert time.time() - t0 < 20
    assert "offline" in (type(e.value).__name__ + str(e.value)).lower()
