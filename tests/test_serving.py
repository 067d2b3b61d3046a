"""scripts/serve_check.py, the engines' side of the serving table: the comparison it reports, its refusals, and (only
where vLLM is importable: its own venv, docs/serving.md) a real vLLM run of a padded tiny student."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import serve_check  # noqa: E402


def _reply(tokens, top):
    return {"tokens": tokens, "top5": top}


def test_compare_counts_agreement_up_to_the_first_difference():
    V = 10
    lp = torch.log_softmax(torch.arange(V, dtype=torch.float64).repeat(3, 1), -1)  # top-5 ids 9..5 every step
    engine_top = {i: lp[0, i].item() for i in range(5, 10)}
    mine = [{"tokens": [9, 9, 9], "logprobs": lp}, {"tokens": [9, 9, 9], "logprobs": lp}]
    same = serve_check.compare(mine, [_reply([9, 9, 9], [engine_top] * 3)] * 2)
    assert same == {"greedy_equal": 2, "prompts": 2, "top5_steps": 6, "top5_same_ids": 6, "max_abs_logprob_diff": 0.0}
    shifted = {i: v + 0.5 for i, v in engine_top.items()}
    other = serve_check.compare(mine, [_reply([9, 9, 9], [engine_top] * 3), _reply([9, 4, 9], [engine_top, shifted])])
    assert other["greedy_equal"] == 1          # the second reply differs at its second token ...
    assert other["top5_steps"] == 5            # ... where its comparison stops (3 + 2 steps)
    assert abs(other["max_abs_logprob_diff"] - 0.5) < 1e-12


@pytest.mark.parametrize("engine, module", [("vllm", "vllm"), ("llama.cpp", "llama_cpp")])
def test_an_engine_that_is_not_installed_is_named_with_the_fix(engine, module, tmp_path):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is importable here: the refusal cannot be seen")
    r = subprocess.run([sys.executable, "scripts/serve_check.py", f"--engine={engine}", f"--model={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{engine} is not importable here" in r.stderr and "the python of the venv" in r.stderr


def test_quantization_needs_llama_cpp_and_held_out_text(tmp_path):
    for extra, said in ((["--engine=vllm", "--quant=Q8_0"], "needs --engine=llama.cpp"),
                        (["--engine=llama.cpp", "--quant=Q8_0", "--held_out=/nonexistent.jsonl"], "is not a file"),
                        (["--engine=llama.cpp", "--held_out_tokens=1"], "held_out_tokens=1: must be >= 2"),
                        (["--engine=llama.cpp", "--keep=attn_k_b"], "it needs --quant"),
                        (["--engine=llama.cpp", "--quant=Q8_0", "--prompt_lengths=64"], "give one of them")):
        r = subprocess.run([sys.executable, "scripts/serve_check.py", f"--model={tmp_path}", *extra], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-2000:])


def test_vllm_serves_a_padded_tiny_student(tmp_path):
    """The tiny teacher's student (r_kv 8 + d_r 16) zero-padded to 512 + 64, served by vLLM beside the teacher:
    greedy replies equal ours on all 8 prompts, and vLLM reports a cache for both."""
    pytest.importorskip("vllm", reason="vLLM lives in its own venv (docs/serving.md); run this file with it")
    from svd_init import upcycle, teacher_text
    from model import Transformer
    teacher = Transformer.from_pretrained(os.path.join(ROOT, "assets/models/tiny_teacher")).eval()
    student = upcycle(teacher, init="rorope", kv_rank=8, qk_rope_dim=16, latent_norm="kv",
                      calib=teacher_text(teacher, 8, 128, seed=1))
    from tokenizer import Tokenizer
    student.save_pretrained(tmp_path / "576", fmt="deepseek", head_size=576,
                            tokenizer=Tokenizer.from_name("", os.path.join(ROOT, "assets/models/tiny_teacher")))
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "scripts/serve_check.py", "--engine=vllm", f"--model={tmp_path / '576'}",
                        "--source=assets/models/tiny_teacher", "--max_new_tokens=16", f"--out={out}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))["models"]
    assert res["student"]["greedy_equal"] == 8 and res["source"]["greedy_equal"] == 8
    assert res["student"]["cache_tokens"] > 0 and res["source"]["cache_tokens"] > 0
