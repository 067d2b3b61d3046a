"""
Checkpoint formats: what a model folder holds and how it maps to model.py's ModelConfig and state dict, kept out of
model.py so that the model reads as a model. Two formats:
    this project's (Hugging Face's Llama config.json, "llama"; plus MLA fields, "llama_mla"; plus Mamba2 fields,
        "llama_hybrid"), safetensors with HF Llama tensor names and the paper's W_DQ ... W_UV for MLA layers;
    DeepSeek-V3 (deepseek.py: the config dict and tensor maps), read back through deepseek.Reader.
Transformer.from_pretrained / save_pretrained call `load_state` / `save_state` here; nothing here imports model.py.
"""
import os
import shutil

import torch

import deepseek
from errors import BadInput
from folders import (check_crc, check_replaceable, file_crcs, read_config_json, rope_of, safetensors_files,
                     save_tensors, write_folder, write_json)


def config_fields(hf: dict) -> dict:
    """A config.json dict (Llama, ours, or DeepSeek-format) -> ModelConfig's keyword arguments."""
    mt = hf.get("model_type", "llama")
    if mt in deepseek.DS_TYPES:  # a DeepSeek-format MLA folder: read as its llama_mla equivalent
        hf, mt = deepseek.Reader(hf).config, "llama_mla"
    if mt not in ("llama", "llama_mla", "llama_hybrid"):
        raise BadInput(f"model_type {mt!r} is not a Llama; this project reads 'llama', 'llama_mla' and "
                       "'llama_hybrid' folders and DeepSeek-V2/V3-format MLA folders "
                       f"({', '.join(deepseek.DS_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise BadInput(f"hidden_act {hf['hidden_act']!r} is not supported (Llama uses silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise BadInput("attention_bias / mlp_bias checkpoints are not supported (no Llama 3 model has them)")
    theta, scaling = rope_of(hf)
    eos = hf.get("eos_token_id")
    n_heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", False),  # HF LlamaConfig's default is False
        bos_id=hf.get("bos_token_id"), eos_id=eos if eos is not None else (),
        mla_layers=hf.get("mla_layers", ()), q_rank=hf.get("mla_q_rank", ()), kv_rank=hf.get("mla_kv_rank", ()),
        qk_nope_dim=hf.get("qk_nope_head_dim", 0), qk_rope_dim=hf.get("qk_rope_head_dim", 0),
        v_head_dim=hf.get("v_head_dim", 0), latent_norm=hf.get("mla_latent_norm", False),
        # folders written before the field existed computed their latent norms with rms_norm_eps
        latent_norm_eps=hf.get("mla_latent_norm_eps", hf.get("rms_norm_eps", 1e-6) if hf.get("mla_latent_norm")
                               else 1e-6),
        qk_rope_theta=float(hf.get("qk_rope_theta", 0.0)), rope_fold=hf.get("qk_rope_fold", 1),
        conversion=hf.get("mla_conversion"),
        mamba_layers=hf.get("mamba_layers", ()), ssm_d_inner=hf.get("ssm_d_inner", 0),
        ssm_d_xb=hf.get("ssm_d_xb", 0), ssm_d_state=hf.get("ssm_d_state", 0), ssm_d_conv=hf.get("ssm_d_conv", 4),
        ssm_chunk=hf.get("ssm_chunk_size", 64),
    )


def config_json(c) -> dict:
    """A ModelConfig -> this project's config.json: a pure Llama loads in transformers' LlamaForCausalLM as is."""
    eos = list(c.eos_id)
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "hidden_act": "silu",
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "bos_token_id": c.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    if c.mla_layers:
        # a different model_type, so transformers refuses the folder instead of silently loading it wrong
        hf.update({
            "architectures": ["LlamaMLAForCausalLM"], "model_type": "llama_mla",
            "mla_layers": list(c.mla_layers), "mla_q_rank": list(c.q_rank),
            "mla_kv_rank": list(c.kv_rank), "qk_nope_head_dim": c.qk_nope_dim,
            "qk_rope_head_dim": c.qk_rope_dim, "v_head_dim": c.v_head_dim,
            "mla_latent_norm": c.latent_norm, "mla_latent_norm_eps": c.latent_norm_eps,
        })
        if c.qk_rope_theta:  # a rotary ladder other than the source's theta over d_r dims (svd_init rorope)
            hf["qk_rope_theta"] = c.qk_rope_theta
        if c.rope_fold != 1:  # a record of how the init built the shared key (svd_init rorope, rope_fold)
            hf["qk_rope_fold"] = c.rope_fold
        if c.conversion is not None:  # a record of the settings the MLA layers were built with
            hf["mla_conversion"] = c.conversion
    if c.mamba_layers:  # Zebra-Llama: the state space layers and their shape
        hf.update({
            "architectures": ["LlamaHybridForCausalLM"], "model_type": "llama_hybrid",
            "mamba_layers": list(c.mamba_layers), "ssm_d_inner": c.ssm_d_inner, "ssm_d_xb": c.ssm_d_xb,
            "ssm_d_state": c.ssm_d_state, "ssm_d_conv": c.ssm_d_conv, "ssm_chunk_size": c.ssm_chunk,
            "layer_types": [c.layer_type(i) for i in range(c.n_layers)],  # for readers; not read back
        })
    return hf


def reader_for(hf: dict):
    """deepseek.Reader for a DeepSeek-format config.json (it maps the tensors), None for this project's format."""
    return deepseek.Reader(hf) if hf.get("model_type") in deepseek.DS_TYPES else None


def load_state(path, hf, expected, tied, dtype=torch.float32, device="cpu") -> dict:
    """The state dict of folder `path` (config.json read as `hf`) for a model whose tensors have the shapes
    `expected` (name -> shape; a tied head left out), every tensor checked; dtype None keeps the stored dtypes.
    Tensors are read one by one (on the CPU, where their bytes are checked against the CRC-32 our files carry) and
    moved to `device`: one copy of the weights at most."""
    from safetensors import safe_open
    reader = reader_for(hf)
    sd, unexpected, mis_shaped = {}, [], []
    for fname in safetensors_files(path):
        try:
            handle = safe_open(os.path.join(path, fname), framework="pt", device="cpu")
        except Exception as e:  # truncated or not a safetensors file: name it
            raise BadInput(f"{os.path.join(path, fname)} cannot be read as safetensors ({e}); the file is "
                           "truncated or corrupt. Fix: copy or download it again") from None
        with handle as f:
            crcs = file_crcs(f)  # ours carry a checksum per tensor; files from elsewhere have none
            for name in f.keys():
                if reader is not None and reader.skip(name):
                    continue
                if reader is not None:
                    raw = f.get_tensor(name)
                    check_crc(raw, name, crcs, os.path.join(path, fname))
                pairs = [(name, None)] if reader is None else reader.tensors(name, raw)
                for k, t in pairs:
                    if k.endswith("rotary_emb.inv_freq") or (k == "lm_head.weight" and tied):
                        continue  # derived buffers of old checkpoints; a tied head duplicates the embedding
                    if k not in expected:
                        unexpected.append(k)
                        continue
                    if t is None:
                        t = f.get_tensor(k)
                        check_crc(t, k, crcs, os.path.join(path, fname))
                    if tuple(t.shape) != tuple(expected[k]):
                        mis_shaped.append(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(expected[k])}")
                        continue
                    sd[k] = t.to(device=device, dtype=dtype if dtype is not None else t.dtype)
    if not sd and not unexpected and not mis_shaped:
        raise BadInput(f"{path}: its safetensors hold no tensors this model reads. Fix: copy the weights again "
                       "from where the model came from")
    if reader is not None:
        sd.update(reader.generated(next(iter(sd.values())).dtype, device))
    missing = sorted(set(expected) - set(sd) - {m.split(':')[0] for m in mis_shaped})
    if missing or unexpected or mis_shaped:
        raise BadInput(f"checkpoint {path} does not match its config.json:\n"
                       + (f"  missing tensors: {missing}\n" if missing else "")
                       + (f"  unexpected tensors: {sorted(unexpected)}\n" if unexpected else "")
                       + (f"  wrong shapes: {mis_shaped}\n" if mis_shaped else "")
                       + "Fix: use the config.json that was saved with these weights.")
    return sd


def save_state(path, config, state_dict, fmt="llama", run_config=None, max_shard_bytes=5 * 2**30, tokenizer=None,
               extra_files=(), **export):
    """Write config.json + safetensors (sharded with an index above max_shard_bytes) into `path`, atomically (a
    temporary folder beside it, which then replaces `path`; folders.write_folder). fmt "deepseek": DeepSeek-V3
    (deepseek.py; a model it cannot hold exactly is refused before anything is written; `export` goes to its
    export_config). run_config.json, the tokenizer's files and extra_files are written beside the weights."""
    if fmt not in ("llama", "deepseek"):
        raise BadInput(f"fmt={fmt!r}: use 'llama' (this project's folders) or 'deepseek' (DeepSeek-V3)")
    if export and fmt != "deepseek":
        raise BadInput(f"{', '.join(export)} shape a DeepSeek-V3 export; this project's format has no such setting. "
                       "Fix: fmt='deepseek'")
    hf = config_json(config) if fmt == "llama" else deepseek.export_config(config, **export)
    check_replaceable(os.path.abspath(os.path.expanduser(str(path))))  # before any copy of the weights
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if fmt == "deepseek":
        sd = deepseek.export_tensors(config, sd, **export)
    elif config.tie_embeddings:
        sd.pop("lm_head.weight")

    def fill(tmp):
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + nbytes
        shards.append(cur)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_tensors(shards[0], os.path.join(tmp, "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_tensors(shard, os.path.join(tmp, name), metadata=meta)
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in sd.values())
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
        hf["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
        write_json(os.path.join(tmp, "config.json"), hf)
        if run_config is not None:
            write_json(os.path.join(tmp, "run_config.json"), run_config)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for f in extra_files:
            shutil.copyfile(f, os.path.join(tmp, os.path.basename(f)))

    write_folder(path, fill, "model.save_pretrained")


def read_config(path, make, hf=None):
    """make(**fields) (make: ModelConfig) of a folder's config.json (or `hf`, that file already read), with errors
    that name the file."""
    hf = read_config_json(path) if hf is None else hf
    try:
        return make(**config_fields(hf))
    except KeyError as e:
        raise BadInput(f"{os.path.join(path, 'config.json')} lacks the field {e.args[0]!r} that a Llama config.json "
                       "has. Fix: restore it from the model's source") from None
    except (TypeError, ValueError) as e:
        raise BadInput(f"{os.path.join(path, 'config.json')}: {e}") from None
