"""evaluate.py: lm-eval's exact request strings and tokenisation, acc vs acc_norm, MMLU aggregation, and end-to-end
scores on the bundled slices (reproducible, with everything needed to reproduce them in the JSON)."""
import json
import math
import os

import pytest
import torch

from conftest import FIXTURES, ROOT, random_model, run_script, tiny_config
from evaluate import (TASKS, aggregate_mmlu, build_requests, encode_pair, kv_report, load_docs, perplexity_and_kl,
                      score_task)
from tokenizer import Tokenizer
from model import Transformer

EVAL = os.path.join(FIXTURES, "eval")


def test_request_strings_match_lm_eval():
    arc = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"}
    assert build_requests("arc_easy", arc) == (["Question: Which is a gas?\nAnswer:"] * 2, [" ice", " steam"], 1,
                                               ["ice", "steam"])
    hs = {"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she",
          "endings": ["bakes [title] it.", " eats  it "], "label": "0"}
    ctx, cont, gold, _ = build_requests("hellaswag", hs)
    assert ctx[0] == "Baking: She mixes flour. Then she" and cont == [" bakes. it.", " eats it"] and gold == 0
    piqa = {"goal": "Open a jar", "sol1": "twist", "sol2": "shout", "label": 0}
    assert build_requests("piqa", piqa)[:3] == (["Question: Open a jar\nAnswer:"] * 2, [" twist", " shout"], 0)
    obqa = {"question_stem": "The sun is a", "choices": {"text": ["star", "moon"], "label": ["A", "B"]},
            "answerKey": "A"}
    assert build_requests("openbookqa", obqa)[:3] == (["The sun is a"] * 2, [" star", " moon"], 0)
    pm = {"QUESTION": "Does X help?", "CONTEXTS": ["First.", "Second."], "final_decision": "maybe"}
    assert build_requests("pubmedqa", pm)[:3] == (["Abstract: First.\nSecond.\nQuestion: Does X help?\nAnswer:"] * 3,
                                                  [" yes", " no", " maybe"], 2)
    mm = {"question": " What is 2+2? ", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "high_school_math"}
    assert build_requests("mmlu", mm)[:3] == (
        ["The following are multiple choice questions (with answers) about high school math.\n\n"
         "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"] * 4, [" A", " B", " C", " D"], 1)
    wg = {"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup", "option2": "the table",
          "answer": "2"}
    assert build_requests("winogrande", wg)[:3] == (
        ["The cup fell off the table because the cup", "The cup fell off the table because the table"],
        [" was wobbly.", " was wobbly."], 1)
    race = [json.loads(l) for l in open(os.path.join(EVAL, "race.jsonl"))][0]
    ctx, cont, gold, _ = build_requests("race", race)
    assert ctx[0] == ("Article: " + race["article"] + "\n\n"
                      "Question: What colour is Tom's kite?\nAnswer: Red\n"
                      "Tom flies the kite with his sister\n"  # a cloze question's blank filled (harness race 3.0)
                      "What happened last Sunday?")
    assert cont == [" The kite flew away.", " It rained.", " Ann lost her bag.", " Tom stayed home."] and gold == 0


def test_encode_pair_moves_trailing_space_and_splits_whole():
    tok = Tokenizer.llama3()
    ctx, cont = encode_pair(tok, "Question: hi\nAnswer: ", "yes")       # trailing space goes to the continuation
    assert tok.decode(ctx) == "Question: hi\nAnswer:" and tok.decode(cont) == " yes"
    whole = tok.encode("The capital is Paris")
    ctx, cont = encode_pair(tok, "The capital is", " Paris")
    assert ctx + cont == whole                                          # tokenised as a whole, then split
    ctx, cont = encode_pair(tok, "", "hello")
    assert ctx == [tok.bos_id]                                          # an empty context gets BOS


def test_acc_norm_can_flip_the_answer(monkeypatch):
    import evaluate
    doc = {"goal": "g", "sol1": "a", "sol2": "a much longer answer", "label": 1}
    # choice 1 has the lower total log-likelihood (-10 < -3) but the higher per-character one (-10/20 > -3/1)
    monkeypatch.setattr(evaluate, "loglikelihoods", lambda *a, **k: [-3.0, -10.0])
    res, _ = score_task(None, None, "piqa", [doc])
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0


def test_mmlu_aggregation_is_weighted_by_size():
    docs = [{"subject": "anatomy"}] * 4 + [{"subject": "philosophy"}] * 2
    correct = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    total, groups, subjects = aggregate_mmlu(docs, correct)
    assert subjects["anatomy"]["acc"] == 0.75 and subjects["philosophy"]["acc"] == 0.0
    assert total["acc"] == 0.5                          # 3 of 6 questions (not the mean of 0.75 and 0.0)
    assert groups["stem"]["acc"] == 0.75 and groups["humanities"]["acc"] == 0.0 and set(groups) == {"stem",
                                                                                                  "humanities"}
    # lm-eval's pooled stderr
    se_a, se_p = subjects["anatomy"]["acc_stderr"], subjects["philosophy"]["acc_stderr"]
    pooled = math.sqrt(((3 * se_a ** 2 * 4) + (1 * se_p ** 2 * 2)) / (6 - 2) / 6)
    assert abs(total["acc_stderr"] - pooled) < 1e-12


@pytest.fixture(scope="module")
def byte_model():
    return random_model(tiny_config(vocab_size=512, max_seq_len=256, bos_id=256, eos_id=(257,)))


def test_every_task_scores_on_the_slices(byte_model):
    tok = Tokenizer.byte_level()
    for task in TASKS:
        docs = load_docs(task, EVAL)
        res, correct = score_task(byte_model, tok, task, docs, batch_size=4)
        assert res["n"] == len(docs) == len(correct) and 0 <= res["acc"] <= 1
        again, _ = score_task(byte_model, tok, task, docs, batch_size=3)   # batching does not change scores
        assert again["acc"] == res["acc"] and again.get("acc_norm") == res.get("acc_norm")


def test_loglikelihood_equals_a_manual_forward(byte_model):
    import evaluate
    tok = Tokenizer.byte_level()
    ll = evaluate.loglikelihoods(byte_model, tok, [("Question: x\nAnswer:", " yes"), ("ab", "c")], batch_size=2)
    ids = tok.encode("ab") + tok.encode("c")
    lp = byte_model(torch.tensor([ids[:-1]])).log_softmax(-1)
    assert abs(ll[1] - lp[0, -1, ids[-1]].item()) < 1e-5


def test_perplexity_kl_and_kv(byte_model):
    tok = Tokenizer.byte_level()
    r = perplexity_and_kl(byte_model, tok, "hello world " * 40, seq_len=64, teacher=byte_model)
    assert r["tokens"] > 400 and abs(r["kl_teacher_student"]) < 1e-6 and r["perplexity"] > 1
    kv = kv_report(byte_model, byte_model, batch=2, context=100, dtype=torch.float32)
    assert kv["percent_of_source"] == 100.0 and kv["bytes"] == 2 * 100 * kv["elements_per_token"] * 4
    # a hybrid: its Mamba2 state is in the percentage (it caches no numbers per token in those layers)
    hybrid = Transformer(tiny_config(mamba_layers=(0, 1, 2, 3), ssm_chunk=4))
    source = Transformer(tiny_config())
    kv = kv_report(hybrid, source, batch=1, context=100, dtype=torch.float32)
    assert kv["elements_per_token"] == 0 and kv["state_bytes"] > 0
    assert kv["percent_of_source"] == 100 * kv["state_bytes"] / source.kv_cache_bytes(1, 100, torch.float32) > 0


def test_command_line_end_to_end(tmp_path, byte_model):
    byte_model.save_pretrained(tmp_path / "m")
    out = tmp_path / "r.json"
    args = [f"--model={tmp_path / 'm'}", "--tokenizer=bytes", "--tasks=all", f"--data_dir={EVAL}", f"--out={out}",
            f"--source={tmp_path / 'm'}", "--speed=True", "--speed_batches=[1]", "--speed_contexts=[16]",
            f"--ppl_data={os.path.join(ROOT, 'tests', 'fixtures', 'eval', 'PROVENANCE.md')}", "--ppl_tokens=300"]
    r = run_script("evaluate.py", args[0], extra=args[1:])
    assert "| m | " in r.stdout and "decode batch 1 context 16" in r.stdout
    res = json.load(open(out))
    assert set(res["tasks"]) == set(TASKS) and res["config"]["data_dir"] == EVAL
    assert res["model_config"]["hidden_size"] == 64 and res["tokenizer"].startswith("llama3_bytes")
    assert res["harness"]["lm_eval"] == "0.4.13" and res["harness"]["task_versions"]["race"] == 3.0
    assert set(res["tasks"]["mmlu"]["groups"]) == {"stem", "humanities", "social_sciences"}
    run_script("evaluate.py", args[0], extra=[a for a in args[1:] if "speed" not in a])
    again = json.load(open(out))["tasks"]                              # a second run: the same scores
    for t in TASKS:
        assert {k: v for k, v in again[t].items() if k != "seconds"} == \
               {k: v for k, v in res["tasks"][t].items() if k != "seconds"}


def test_shared_context_one_forward_equals_separate_scoring():
    """MMLU's " A".." D" are one token each under Llama 3: scored from one forward of the shared context, they must
    equal scoring each request on its own (float64: an exactness claim)."""
    import evaluate
    tok = Tokenizer.llama3()
    m = random_model(tiny_config(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                 head_dim=8, intermediate_size=16, max_seq_len=128)).double()
    doc = {"subject": "anatomy", "question": "Which bone?", "choices": ["femur", "ulna", "tibia", "skull"],
           "answer": 2}
    ctxs, conts, _, _ = build_requests("mmlu", doc)
    pairs = list(zip(ctxs, conts)) + [("Question: x\nAnswer:", " a longer reply")]
    assert all(len(encode_pair(tok, c, x, True)[1]) == 1 for c, x in pairs[:4])
    calls = []
    orig = m.forward
    m.forward = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    together = evaluate.loglikelihoods(m, tok, pairs, batch_size=8, add_bos=True)
    assert len(calls) == 2                                    # one forward for the four choices, one for the rest
    alone = [evaluate.loglikelihoods(m, tok, [p], add_bos=True)[0] for p in pairs]
    assert max(abs(a - b) for a, b in zip(together, alone)) < 1e-9


def test_mmlu_single_document_subject_gives_na_not_zero():
    docs = [{"subject": "anatomy"}] * 3 + [{"subject": "astronomy"}]
    total, groups, subjects = aggregate_mmlu(docs, [1.0, 0.0, 1.0, 1.0])
    assert subjects["astronomy"]["acc_stderr"] is None                  # the harness: N/A for n = 1
    assert groups["stem"]["acc_stderr"] is None and total["acc_stderr"] is None
    assert subjects["anatomy"]["acc_stderr"] > 0
    json.dumps(total, allow_nan=False)                                  # valid JSON, no bare NaN


def test_limit_is_per_mmlu_subject_and_fewshot_is_first_n():
    from evaluate import limit_docs
    docs = [{"subject": s, "i": i} for s in ("anatomy", "virology") for i in range(5)]
    assert [(d["subject"], d["i"]) for d in limit_docs("mmlu", docs, 2)] == \
        [("anatomy", 0), ("anatomy", 1), ("virology", 0), ("virology", 1)]
    assert len(limit_docs("arc_easy", docs, 2)) == 2
    shots = [{"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": 1},
             {"question": " 2+2? ", "choices": ["4", "5", "6", "7"], "answer": 0}]
    doc = {"subject": "high_school_mathematics", "question": "3+3?", "choices": ["5", "6", "7", "8"], "answer": 1}
    ctx = build_requests("mmlu", doc, shots)[0][0]
    assert ctx == ("The following are multiple choice questions (with answers) about high school mathematics.\n\n"
                   "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                   "2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
                   "3+3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:")


def test_task_names_and_data_are_checked_before_scoring(tmp_path, byte_model):
    byte_model.save_pretrained(tmp_path / "m", tokenizer=Tokenizer.byte_level())
    out = tmp_path / "r.json"
    base = [f"--model={tmp_path / 'm'}", f"--data_dir={EVAL}", f"--out={out}"]
    r = run_script("evaluate.py", base[0], extra=base[1:] + ["--tasks=arc_easy,arc_chalenge"], check=False)
    assert r.returncode != 0 and "unknown task 'arc_chalenge' (did you mean 'arc_challenge'?)" in r.stderr
    assert not out.exists() and "arc_easy: acc" not in r.stdout
    part = tmp_path / "part"
    part.mkdir()
    (part / "arc_easy.jsonl").write_text(open(os.path.join(EVAL, "arc_easy.jsonl")).read())
    r = run_script("evaluate.py", base[0], extra=[f"--data_dir={part}", f"--out={out}", "--tasks=arc_easy,piqa"],
                   check=False)
    assert r.returncode != 0 and "piqa.jsonl not found" in r.stderr and not out.exists()
    r = run_script("evaluate.py", base[0], extra=base[1:] + ["--tasks=piqa", "--num_fewshot=5"], check=False)
    assert r.returncode != 0 and "MMLU only" in r.stderr


def test_results_are_written_after_each_task(tmp_path, byte_model):
    byte_model.save_pretrained(tmp_path / "m", tokenizer=Tokenizer.byte_level())
    (tmp_path / "broken").mkdir()                            # a teacher that fails to load, after the tasks
    (tmp_path / "broken" / "config.json").write_text(json.dumps(tiny_config(vocab_size=512).to_hf()))  # its ids
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x00" * 10)
    out = tmp_path / "r.json"
    r = run_script("evaluate.py", f"--model={tmp_path / 'm'}", check=False,
                   extra=[f"--data_dir={EVAL}", f"--out={out}", "--tasks=arc_easy,mmlu",
                          f"--ppl_data={os.path.join(EVAL, 'PROVENANCE.md')}", f"--teacher={tmp_path / 'broken'}"])
    assert r.returncode != 0 and "cannot be read as safetensors" in r.stderr
    res = json.loads(out.read_text())                       # parses: valid JSON, NaN-free
    assert set(res["tasks"]) == {"arc_easy", "mmlu"} and res["add_bos"] is True


def test_a_model_scored_with_the_wrong_tokenizer_is_refused():
    from tokenizer import check_tokenizer_for
    with pytest.raises(ValueError, match="tokenizer_tok512.json"):
        check_tokenizer_for(Tokenizer.byte_level(), os.path.join(FIXTURES, "stories260K"))
