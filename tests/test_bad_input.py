"""The user's files survive every script, and bad input gets one clean line (the problem and the fix, exit 2, once
under torchrun), before any work: the names a run owns in its out_dir (exactly those, by step number), outputs apart
from inputs, results files, a full disk mid-checkpoint, range checks, config-file errors, did-you-mean, rows a
tokenizer or chat template refuses, ~ paths, calibration requests that cannot be met, shared config files."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from configurator import SCRIPTS as PIPELINE
from conftest import ROOT, byte_teacher_and_sft, run_script, tiny_config, write_config
from folders import (check_apart, check_results_file, checkpoints, claim_out_dir, latest_checkpoint,
                     write_results_file)
from tokenizer import Tokenizer


def run(args, timeout=120, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def clean_error(r, *needles):
    """One line 'error: ...' on stderr naming every needle, exit code 2, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-3000:])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return byte_teacher_and_sft(tmp_path_factory.mktemp("bad_input"))


def distill_cfg(tiny, name, **over):
    cfg = dict(init_from=str(tiny / "teacher"), q_rank=32, kv_rank=8, qk_nope_dim=8, qk_rope_dim=8,
               sft_data=[str(tiny / "sft.json")], data_cache=str(tiny / "cache"), val_every=10, seq_len=32,
               micro_batch=2, tokens_per_step=128, max_steps=2, lr=3e-3, kl_chunk=24, log_every=1, eval_every=100,
               eval_batches=2, ckpt_every=2, out_dir=str(tiny / name))
    cfg.update(over)
    return write_config(tiny / f"{name}.py", **cfg), cfg["out_dir"]


def snapshot(folder):
    return sorted((os.path.relpath(os.path.join(r, f), folder), open(os.path.join(r, f), "rb").read())
                  for r, _, fs in os.walk(folder) for f in fs)


# --- 1. every script, scripts/ included, takes its settings through configurator.py

SCRIPTS = list(PIPELINE) + sorted(os.path.join("scripts", f) for f in os.listdir(os.path.join(ROOT, "scripts"))
                                     if f.endswith(".py"))


def test_every_script_is_found():
    assert {"distill.py", "dpo.py", "svd_init.py", "zebra.py", "export.py", "evaluate.py",
            os.path.join("scripts", "tiny_ablation.py")} <= set(SCRIPTS)
    # configurator.SCRIPTS is a list kept by hand (a shared config file may hold any of their settings): a new
    # top-level script that takes settings must be added there
    takes_settings = {f for f in os.listdir(ROOT) if f.endswith(".py") and f != "configurator.py"
                      and "configure(globals()" in open(os.path.join(ROOT, f)).read()}
    assert takes_settings == set(PIPELINE), takes_settings ^ set(PIPELINE)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_a_typo_run_nothing(script):
    t0 = time.time()
    r = run([script, "--help"], timeout=60)
    assert r.returncode == 0 and "settings (a config file, then --key=value" in r.stdout, r.stderr[-2000:]
    assert "python " in r.stdout                                              # the commands to run it
    r = run([script, "--nrpoc=1"], timeout=60)
    clean_error(r, "unknown setting")
    assert time.time() - t0 < 60                                              # nothing ran


def test_tiny_ablation_keeps_a_users_notes(tmp_path):
    row = tmp_path / "ablation" / "rorope_init_r_kv_8_d_r_16_kl_the_default"
    row.mkdir(parents=True)
    (row / "notes.txt").write_text("keep")
    assert run(["scripts/tiny_ablation.py", "--help"]).returncode == 0
    r = run(["scripts/tiny_ablation.py", "--nproc=1", "--only=the default", f"--out_root={tmp_path / 'ablation'}"],
            timeout=300)
    assert r.returncode == 0 and "failed" in r.stdout and "notes.txt" in r.stdout, r.stdout + r.stderr
    assert sorted(os.listdir(row)) == ["notes.txt"] and (row / "notes.txt").read_text() == "keep"


# --- 2. an output folder equal to, inside or containing an input: refused before any work

def test_check_apart(tmp_path):
    (tmp_path / "in").mkdir()
    for out, rel in ((tmp_path / "in", "is the input"), (tmp_path / "in" / "sub", "lies inside the input"),
                     (tmp_path, "contains the input")):
        with pytest.raises(ValueError, match=rel):
            check_apart(out, "out_dir", {"init_from": tmp_path / "in"})
    os.symlink(tmp_path / "in", tmp_path / "link")                            # the same folder by another name
    with pytest.raises(ValueError, match="is the input"):
        check_apart(tmp_path / "link", "out_dir", {"init_from": tmp_path / "in"})
    check_apart(tmp_path / "elsewhere", "out_dir", {"init_from": tmp_path / "in", "hub": "org/model"})
    with pytest.raises(ValueError, match="the other output data_cache"):   # outputs apart, existing or not
        check_apart(tmp_path / "o", "out_dir", {}, {"data_cache": tmp_path / "o" / "cache"})


def test_conversions_refuse_to_write_over_their_source(tiny, tmp_path):
    src = tmp_path / "student"
    r = run(["svd_init.py", f"--init_from={tiny / 'teacher'}", "--q_rank=32", "--kv_rank=8", "--qk_nope_dim=8",
             "--qk_rope_dim=8", "--init=svd", f"--out_dir={src}"])
    assert r.returncode == 0, r.stderr[-2000:]
    before = snapshot(src)
    for args in (["export.py", str(src), str(src), "--dtype=bfloat16"],
                 ["export.py", "--dtype=bfloat16", str(src), str(src / "ds")],      # a flag before the paths
                 ["svd_init.py", f"--init_from={src}", "--mla_layers=[2,3]", f"--out_dir={src}"],
                 ["zebra.py", f"--init_from={src}", f"--out_dir={src}"],
                 ["evaluate.py", f"--model={src}", f"--out={src / 'results.json'}"]):
        r = run(args)
        clean_error(r, "out", "Fix:")
        assert "is the input" in r.stderr or "lies inside the input" in r.stderr, (args, r.stderr)
    assert snapshot(src) == before
    cfg, out = distill_cfg(tiny, "own_input", student_from=str(tmp_path / "run" / "final"), kv_rank=None,
                           q_rank=None, qk_nope_dim=None, qk_rope_dim=None, out_dir=str(tmp_path / "run"))
    os.makedirs(tmp_path / "run")
    os.rename(src, tmp_path / "run" / "final")
    r = run_script("distill.py", cfg, check=False)
    clean_error(r, "contains the input student folder")
    assert snapshot(tmp_path / "run" / "final") == before


# --- 3./4. a run owns exactly the names it writes; a link is a user's file

@pytest.mark.parametrize("name,is_dir", [("ckpt-0000001.bak", True), ("ckpt-best", True), ("ckpt-notes", True),
                                         ("final_report.txt", False), ("distill.txt.bak", False),
                                         ("replaced-mine", True), ("ckpt-0000001", False)])
def test_a_users_lookalike_names_are_refused_and_kept(tmp_path, name, is_dir):
    out = tmp_path / "run"
    (out / "ckpt-0000002").mkdir(parents=True)
    (out / "ckpt-0000002" / "meta.json").write_text("{}")
    p = out / name
    if is_dir:
        p.mkdir()
        (p / "meta.json").write_text("{}")                                    # looks complete
        (p / "mine.txt").write_text("keep")
    else:
        p.write_text("keep")
    assert checkpoints(str(out)) == [str(out / "ckpt-0000002")]            # never resumed from, never pruned
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=name.replace(".", r"\.")):
        claim_out_dir(str(out), False, "distill")
    assert snapshot(out) == before


def test_checkpoints_are_sorted_by_step_number(tmp_path):
    for step in (9, 10, 100, 2):
        (tmp_path / f"ckpt-{step:07d}").mkdir()
        (tmp_path / f"ckpt-{step:07d}" / "meta.json").write_text("{}")
    (tmp_path / "ckpt-0000011.tmp").mkdir()                                  # incomplete: not a checkpoint
    assert [os.path.basename(c) for c in checkpoints(str(tmp_path))] == \
        ["ckpt-0000002", "ckpt-0000009", "ckpt-0000010", "ckpt-0000100"]
    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-0000100")


def test_a_link_in_out_dir_is_a_users_file(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data.txt").write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(target, out / "ckpt-0000003")                                 # even under a run's own name
    os.symlink(target, out / "mine")
    assert checkpoints(str(out)) == []
    with pytest.raises(FileExistsError, match="ckpt-0000003"):
        claim_out_dir(str(out), False, "distill")
    assert sorted(os.listdir(out)) == ["ckpt-0000003", "mine"] and (target / "data.txt").read_text() == "keep"


def test_a_fresh_start_moves_only_run_files_and_never_merges(tmp_path):
    out = tmp_path / "run"
    (out / "ckpt-0000002").mkdir(parents=True)
    (out / "ckpt-0000002" / "meta.json").write_text("{}")
    (out / "distill.txt").write_text("log")
    (out / "replaced-20260101-000000").mkdir()
    assert claim_out_dir(str(out), False, "distill") is False
    moved = [n for n in os.listdir(out) if n.startswith("replaced-") and n != "replaced-20260101-000000"]
    assert len(moved) == 1 and sorted(os.listdir(out / moved[0])) == ["ckpt-0000002", "distill.txt"]


# --- 5. a results file is replaced only when this project wrote it

def test_results_file_of_someone_else_is_refused(tmp_path, capsys):
    mine = tmp_path / "r.json"
    write_results_file(str(mine), {"results": {}}, "evaluate.py")
    check_results_file(str(mine))                                             # ours: may be replaced
    for text in ('{"my": "numbers"}', "notes, not JSON", "[1, 2]"):
        (tmp_path / "other.json").write_text(text)
        with pytest.raises(FileExistsError, match="is not a results file this project wrote"):
            check_results_file(str(tmp_path / "other.json"))
    (tmp_path / "d").mkdir()
    with pytest.raises(FileExistsError, match="is not a plain file"):
        check_results_file(str(tmp_path / "d"))


def test_evaluate_refuses_a_foreign_out_before_loading(tiny, tmp_path):
    (tmp_path / "mine.json").write_text('{"my": "numbers"}')
    r = run(["evaluate.py", f"--model={tiny / 'teacher'}", "--tasks=arc_easy", "--limit=2",
             f"--out={tmp_path / 'mine.json'}"])
    clean_error(r, "is not a results file this project wrote", "Fix:")
    assert (tmp_path / "mine.json").read_text() == '{"my": "numbers"}'


# --- 6. loss_on=assistant with no target token

def test_no_assistant_token_in_the_held_out_slice_is_refused_before_the_out_dir(tiny, tmp_path):
    rows = [{"instruction": "word " * 200, "input": "", "output": "ok"} for _ in range(60)]   # replies past seq_len
    (tmp_path / "long.json").write_text(json.dumps(rows))
    cfg, out = distill_cfg(tiny, "no_targets", sft_data=[str(tmp_path / "long.json")], loss_on="assistant",
                           data_cache=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"))
    r = run_script("distill.py", cfg, check=False)
    clean_error(r, "has no target token with loss_on='assistant'", "Fix:")
    assert not os.path.exists(tmp_path / "run")                              # the out_dir was never touched


def test_steps_without_a_target_token_are_skipped_with_a_line(tiny, tmp_path):
    # half the rows have their reply inside the packed sequences, half do not: some steps have no target token
    rows = []
    for i in range(200):
        rows.append({"instruction": "word " * 200, "input": "", "output": "ok"} if i % 7 else
                    {"instruction": "Hi", "input": "", "output": "The reply."})
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    cfg, out = distill_cfg(tiny, "skips", sft_data=[str(tmp_path / "mixed.json")], loss_on="assistant",
                           data_cache=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"), max_steps=12,
                           tokens_per_step=64, eval_batches=20, ckpt_every=100)
    r = run_script("distill.py", cfg, check=False)
    assert r.returncode == 0 and "ZeroDivisionError" not in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no target token in this step's batches; skipped" in r.stdout, r.stdout[-3000:]
    assert os.path.exists(os.path.join(out, "final"))


# --- 7. evaluate.py's numbers

@pytest.mark.parametrize("flag,msg", [("--limit=-1", "limit=-1: must be >= 0"), ("--limit=-6", "limit=-6"),
                                      ("--num_fewshot=-1", "num_fewshot=-1: must be >= 0"),
                                      ("--tasks=arc_easy,piqa,arc_easy", "lists 'arc_easy' more than once"),
                                      ("--batch_size=0", "batch_size=0")])
def test_evaluate_settings(tiny, tmp_path, flag, msg):
    r = run(["evaluate.py", f"--model={tiny / 'teacher'}", flag, f"--out={tmp_path / 'r.json'}"])
    clean_error(r, msg)
    assert not os.path.exists(tmp_path / "r.json")


# --- 8. a full disk mid-checkpoint: the clean message, nothing half-written left

def _small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                            # a write past the limit: EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_full_disk_during_a_checkpoint(tiny, tmp_path):
    cfg, out = distill_cfg(tiny, "full", out_dir=str(tmp_path / "run"), data_cache=str(tmp_path / "cache"))
    run(["data.py", f"--sft_data={[str(tiny / 'sft.json')]}", f"--cache={tmp_path / 'cache'}", "--val_every=10"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "distill.py", cfg], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, preexec_fn=_small_files)
    clean_error(r, "writing checkpoint", "failed", "Fix: free disk space, then resume with --resume=True")
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")], os.listdir(out)
    assert not os.path.exists(os.path.join(out, ".lock"))


# --- 9. resume: no false alarm, the right label

def test_resume_has_no_false_alarm_and_labels_its_eval(tiny):
    cfg, out = distill_cfg(tiny, "resume_label", max_steps=2, eval_every=2)
    run_script("distill.py", cfg)
    r = run_script("distill.py", cfg, extra=["--resume=True", "--max_steps=4"])
    warnings = [line for line in r.stdout.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "schedule changed since the checkpoint: max_steps 2 -> 4" in warnings[0], warnings
    assert "held-out at step 2 (resumed there)" in r.stdout and "held-out at init" not in r.stdout, r.stdout


# --- 10.-12. one clean line, once, exit 2; config files; did you mean; flags before paths

def test_one_clean_line_under_torchrun(tiny):
    cfg, _ = distill_cfg(tiny, "torchrun_err", kv_rank=10_000)
    r = run_script("distill.py", cfg, nproc=2, check=False)
    assert r.returncode != 0 and r.stderr.count("error: kv_rank=10000") == 1, r.stderr[-3000:]
    assert "ZeroDivisionError" not in r.stderr and "gloo" not in r.stderr.lower(), r.stderr[-3000:]
    r = run_script("distill.py", cfg, check=False)
    clean_error(r, "kv_rank=10000")
    assert r.stderr.strip().count("\n") == 0                                  # one line


def test_config_file_errors_name_the_line(tmp_path):
    (tmp_path / "syntax.py").write_text("kv_rank = 8\nq_rank = (32\n")
    (tmp_path / "name.py").write_text("kv_rank = 8\nq_rank = thirty_two\n")
    for f, msg in (("syntax.py", "syntax.py, line 2"), ("name.py", "name.py, line 2: NameError: name 'thirty_two'")):
        clean_error(run(["svd_init.py", str(tmp_path / f)]), msg)


def test_did_you_mean():
    clean_error(run(["svd_init.py", "--kv_budjet=64"]), "unknown setting", "Did you mean kv_budget?")
    clean_error(run(["distill.py", "--lernig_rate=1"]), "unknown setting")


def test_an_engine_without_a_conversion_is_refused(tiny, tmp_path):
    clean_error(run(["distill.py", f"--student_from={tiny / 'teacher'}", "--engine=sglang",
                     f"--out_dir={tmp_path / 'o'}"]), "engine aims a conversion", "Fix: drop engine")
    clean_error(run(["svd_init.py", "--engine=sglang", "--latent_norm=kv", f"--out_dir={tmp_path / 'o'}"]),
                "give kv_budget")
    assert not os.path.exists(tmp_path / "o")


def test_flags_may_come_before_the_paths(tiny, tmp_path):
    r = run(["export.py", "--dtype=bfloat16", str(tiny / "teacher"), str(tmp_path / "ds")])
    assert "config file" not in r.stderr and "SyntaxError" not in r.stderr, r.stderr[-2000:]
    clean_error(r, "cannot be exported exactly", "Fix:")                     # a GQA folder: nothing to export
    r = run(["export.py", str(tiny / "teacher"), str(tmp_path / "ds"), str(tmp_path / "third")])
    clean_error(r, "third")


# --- 13. rows a tokenizer or chat template refuses are counted, named and skipped

def test_refused_rows_are_named_and_skipped(tmp_path):
    import shutil
    from data import build_cache
    folder = tmp_path / "tok"
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "tokenizers", "bytebpe"), folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")
    tok = Tokenizer.from_pretrained(folder)
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4"},
                          {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "user", "content": "bad \ud800 text"}, {"role": "assistant", "content": "x"}]}]
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")             # json escapes the surrogate as \ud800
    logs = []
    cache = build_cache([str(p)], tok, str(tmp_path / "cache"), log=logs.append)
    meta = json.load(open(os.path.join(cache, "meta.json")))
    assert meta["documents"] == 1
    text = " ".join(logs)
    assert f"{p}:2: the tokenizer or chat template refused it" in text and "System role not supported" in text
    assert f"{p}:3: a turn with the role 'tool'" in text
    assert f"{p}:4: a lone surrogate" in text


# --- 14. paths: ~ expanded, / decided at the top

def test_home_paths_are_expanded(tmp_path):
    from configurator import configure
    ns = {"out_dir": "out/x", "sft_data": ["a.json"]}
    configure(ns, ["--out_dir=~/nanomla-x", "--sft_data=['~/a.json', 'b.json']"])
    assert ns["out_dir"] == os.path.expanduser("~/nanomla-x") and not ns["out_dir"].startswith("~")
    assert ns["sft_data"] == [os.path.expanduser("~/a.json"), "b.json"]
    (tmp_path / "c.py").write_text("out_dir = '~/from-file'\n")
    configure(ns, [str(tmp_path / "c.py")])
    assert ns["out_dir"] == os.path.expanduser("~/from-file")


def test_out_dir_root_is_refused_at_the_top(tiny):
    r = run(["distill.py", f"--init_from={tiny / 'teacher'}", "--kv_rank=8", "--q_rank=32", "--qk_nope_dim=8",
             "--qk_rope_dim=8", f"--sft_data={[str(tiny / 'sft.json')]}", "--out_dir=/"], timeout=60)
    clean_error(r)
    assert "PermissionError" not in r.stderr


# --- 15. calibration requests that cannot be met

@pytest.mark.parametrize("flag,msg", [("--calib_tokens=100000000", "(100000000 tokens)"),
                                      ("--calib_seq_len=4096", "calib_seq_len=4096 is beyond the model's 128"),
                                      ("--calib_seq_len=512", "Fix: --calib_seq_len=128 or less")])
def test_calibration_that_cannot_be_met_is_refused(tiny, tmp_path, flag, msg):
    t0 = time.time()
    r = run(["svd_init.py", f"--init_from={tiny / 'teacher'}", "--kv_budget=64", "--init=rorope", "--calib_seq_len=128",
             flag, f"--out_dir={tmp_path / 'o'}"])
    clean_error(r, msg, "Fix:")
    assert not os.path.exists(tmp_path / "o") and time.time() - t0 < 60


def test_calibration_beyond_memory_is_refused(monkeypatch):
    import svd_init
    cfg = tiny_config()
    monkeypatch.setattr(svd_init, "_available_memory", lambda: 2**30)
    with pytest.raises(ValueError, match=r"calib_tokens=1000000000 would hold about 7.5 GiB .* Fix: calib_tokens <= "):
        svd_init.Conversion(q_rank=32, kv_rank=8, qk_rope_dim=8, init="rorope").checked(cfg, calib_tokens=10**9,
                                                                                        calib_seq_len=64)
    svd_init.Conversion(q_rank=32, kv_rank=8, qk_rope_dim=8, init="rorope").checked(cfg, calib_tokens=8192,
                                                                                    calib_seq_len=64)


# --- 16. a shared pipeline config; zebra's conflicting placements

def test_a_shared_config_is_accepted_by_every_script(tmp_path):
    shared = write_config(tmp_path / "pipeline.py", mla_fraction=0.25, dtype="bfloat16", lr=1e-4, beta=0.1,
                          tasks="arc_easy", kv_budget=64)
    for script in ("svd_init.py", "distill.py", "dpo.py", "evaluate.py", "zebra.py", "export.py"):
        r = run([script, shared, "--help"], timeout=60)                    # --help: the file read, nothing run
        assert r.returncode == 0 and "unknown setting" not in r.stderr, (script, r.stderr[-2000:])
    r = run(["zebra.py", shared, "--help"], timeout=60)
    assert "--mla_fraction=0.25" in r.stdout                                 # the file's value, resolved
    (tmp_path / "typo.py").write_text("mla_fracton = 0.25\n")                # a key no script has: refused
    clean_error(run(["svd_init.py", str(tmp_path / "typo.py"), "--help"], timeout=60), "unknown setting")


@pytest.mark.parametrize("other", ["--mla_layers=[1]", "--n_mla=1", "--cache_budget=0.3"])
def test_zebra_refuses_mla_fraction_beside_another_placement(tiny, tmp_path, other):
    r = run(["zebra.py", f"--init_from={tiny / 'teacher'}", "--mla_fraction=0.5", other, f"--out_dir={tmp_path}/z"])
    clean_error(r, "mla_fraction")
    assert not os.path.exists(tmp_path / "z")


def test_a_failed_swap_puts_the_earlier_folder_back(tmp_path, monkeypatch):
    import folders
    target = tmp_path / "model"
    folders.write_folder(str(target), lambda d: open(os.path.join(d, "a.txt"), "w").write("old"))
    real = os.replace

    def failing(src, dst):
        if os.path.basename(str(src)).startswith("model.tmp-"):   # the new folder's move into place
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(folders.os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        folders.write_folder(str(target), lambda d: open(os.path.join(d, "a.txt"), "w").write("new"))
    assert (target / "a.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["model"]


# --- 13. settings that cannot do what the user meant: refused before work, or meaning what nanoGPT means

def test_grad_clip_zero_means_no_clipping(tiny, tmp_path):
    """grad_clip=0 is nanoGPT's "no clipping": the same model as a clip no gradient reaches. (clip_grad_norm_(..., 0)
    used to zero every gradient: a run that trained nothing and ended rc 0.)"""
    import torch
    from safetensors.torch import load_file
    finals = {}
    for clip in (0.0, 1e9):
        cfg, out = distill_cfg(tiny, f"clip{clip:g}", grad_clip=clip, out_dir=str(tmp_path / f"clip{clip:g}"),
                               data_cache=str(tmp_path / "cache"))
        run_script("distill.py", cfg)
        finals[clip] = load_file(os.path.join(out, "final", "model.safetensors"))
    assert finals[0.0].keys() == finals[1e9].keys()
    assert all(torch.equal(finals[0.0][k], finals[1e9][k]) for k in finals[0.0])


@pytest.mark.parametrize("script,flags,msg", [
    ("distill.py", ["--kl_weight=0", "--ce_weight=0"], "nothing would train"),
    ("distill.py", ["--export_dtype=int8"], "export_dtype='int8'"),
    ("distill.py", ["--export_dtype=bfloat61"], "Fix: --export_dtype=bfloat16"),
    ("distill.py", ["--betas=(0.9,)"], "AdamW takes two decay rates"),
    ("distill.py", ["--betas=(1.5, 0.9)"], "AdamW takes two decay rates"),
    ("dpo.py", ["--export_dtype=int8"], "export_dtype='int8'"),
    ("dpo.py", ["--betas=('a', 'b')"], "AdamW takes two decay rates"),
    ("svd_init.py", ["--init=rorope", "--kv_balance=-1"], "kv_balance=-1.0: the weight of key errors"),
    ("svd_init.py", ["--init=rorope", "--kv_balance=0"], "kv_balance=0.0: the weight of key errors"),
    ("distill.py", ["--seed=-3"], "seed=-3: must be >= 0"),  # was numpy's "expected non-negative integer"
    ("zebra.py", ["--seed=-1"], "seed=-1: must be >= 0"),
    ("distill.py", ["config/tiny_kv8.py", "--seq_len=100000"], "seq_len=100000 is beyond"),  # named calib_seq_len
    ("dpo.py", ["--beta=0"], "beta=0: the DPO loss is then log 2"),  # trained 25 steps of a constant loss
    ("dpo.py", ["--max_prompt_length=2000"], "max_prompt_length=2000 >= max_length=1024")])
def test_settings_that_cannot_work_are_refused_before_work(tiny, tmp_path, script, flags, msg):
    t0 = time.time()
    r = run([script, *flags, f"--out_dir={tmp_path / 'o'}"])
    clean_error(r, msg)
    assert not os.path.exists(tmp_path / "o") and time.time() - t0 < 60


def test_bench_sizes_and_evaluate_model_are_checked_first():
    clean_error(run(["bench.py", "decode", "--batches=0"]), "batches='0': give positive integers")  # int() traceback
    clean_error(run(["bench.py", "decode", "--contexts=a"]), "contexts='a': give positive integers")
    # the model before the hub datasets: was the datasets' ConnectionError traceback after 40 s of retries, offline
    clean_error(run(["evaluate.py", "--model=/nonexistent"], timeout=30), "'/nonexistent' is not a model folder")


def test_upcycle_refuses_a_kv_balance_that_is_not_a_weight():
    import torch
    from conftest import random_model
    from svd_init import upcycle
    m = random_model(tiny_config())
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="kv_balance"):
            upcycle(m, init="rorope", kv_rank=8, kv_balance=bad, calib=torch.randint(0, 96, (4, 32)))


def test_a_source_with_nan_weights_is_named_not_a_linalg_error():
    import torch
    from conftest import random_model
    from svd_init import upcycle
    m = random_model(tiny_config())
    for init, x in (("svd", "nan"), ("rorope", "nan"), ("svd", "inf"), ("svd", "-inf")):
        with torch.no_grad():
            m.model.layers[2].self_attn.k_proj.weight[3, 5] = float(x)
        with pytest.raises(ValueError, match=r"model.layers.2.self_attn.k_proj.weight holds NaN or Inf"):
            upcycle(m, init=init, kv_rank=8, calib=torch.randint(0, 96, (4, 32)))


@pytest.mark.parametrize("script", ["svd_init.py", "evaluate.py", "distill.py"])
def test_a_gpu_asked_for_without_one_is_one_line(script, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    clean_error(run([script, "--device=cuda", f"--out_dir={tmp_path / 'o'}"] if script != "evaluate.py" else
                    [script, "--device=cuda"]), "device='cuda'", "Fix: --device=cpu")


def test_evaluate_refuses_a_teacher_with_another_tokenizer(tiny, tmp_path):
    """A KL between models that read different token ids was written as a number (25.4 nats)."""
    from conftest import STORIES
    r = run(["evaluate.py", f"--model={tiny / 'teacher'}", f"--teacher={STORIES}", "--tasks=",
             f"--ppl_data={tiny / 'sft.json'}", f"--out={tmp_path / 'r.json'}"])
    clean_error(r, "teacher", "tokenizer")
    assert not os.path.exists(tmp_path / "r.json")


def test_an_empty_lock_blocks_only_while_it_is_new(tmp_path):
    """A lock created but never written (a crash between the two) used to block the out_dir forever."""
    import socket
    from folders import release_lock, take_lock
    lock = tmp_path / ".lock"
    lock.write_text("")
    with pytest.raises(RuntimeError, match=r"in use by another run \(process \(empty\)"):
        take_lock(str(tmp_path))                      # new: perhaps a run writing it this instant
    old = time.time() - 60
    os.utime(lock, (old, old))
    take_lock(str(tmp_path))                          # a minute old and still empty: stale, taken
    assert lock.read_text().strip() == f"{os.getpid()}@{socket.gethostname()}"
    release_lock(str(tmp_path))


@pytest.mark.parametrize("script", ["svd_init.py", "export.py"])
def test_a_converter_does_not_write_into_a_live_runs_out_dir(tiny, tmp_path, script):
    import socket
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(f"{os.getpid()}@{socket.gethostname()}\n")   # this test's process: alive
    args = ([f"--init_from={tiny / 'teacher'}", "--kv_rank=8", f"--out_dir={run_dir / 'final'}"]
            if script == "svd_init.py" else [str(tiny / "teacher"), str(run_dir / "final")])
    clean_error(run([script, *args]), "which a training run is using", "Fix: choose an out_dir outside it")
    assert sorted(os.listdir(run_dir)) == [".lock"]


@pytest.mark.parametrize("row,msg", [
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', "gold answer 2 is not one"),
    ('{"goal": "g", "sol1": "a", "sol2": "b"}', "cannot read (KeyError"),
    ('{"goal": "g", "sol1": ', "not a JSON row")])
def test_evaluation_rows_that_cannot_be_scored_are_named_with_file_and_line(tiny, tmp_path, row, msg):
    """A gold label out of range was scored as a miss; a malformed row was a traceback mid-run."""
    good = '{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}'
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "piqa.jsonl").write_text(good + "\n" + row + "\n")
    r = run(["evaluate.py", f"--model={tiny / 'teacher'}", "--tasks=piqa", f"--data_dir={tmp_path / 'data'}",
             f"--out={tmp_path / 'r.json'}"])
    clean_error(r, f"piqa.jsonl:2: ", msg)
    assert not os.path.exists(tmp_path / "r.json")


def test_resume_skips_an_unreadable_newest_checkpoint(tiny, tmp_path):
    """A damaged newest checkpoint (a disk that lied, a copy cut short) was a traceback on resume, and a byte flipped
    inside a tensor was resumed from without a word; now the run names it, resumes from the one before and ends."""
    cfg, out = distill_cfg(tiny, "corrupt", out_dir=str(tmp_path / "run"), data_cache=str(tmp_path / "cache"),
                           max_steps=4, ckpt_every=2)
    run_script("distill.py", cfg)
    newest = os.path.join(out, "ckpt-0000004", "optimizer.safetensors")
    data = bytearray(open(newest, "rb").read())
    data[-5] ^= 0x10                            # one bit of the last tensor's bytes: the header still reads
    open(newest, "wb").write(bytes(data))
    r = run_script("distill.py", cfg, extra=["--resume=True", "--max_steps=6"])
    assert "ckpt-0000004 cannot be read" in r.stdout and "differ from the checksum" in r.stdout, r.stdout
    assert "resume: " in r.stdout and "(step 2)" in r.stdout, r.stdout
    assert os.path.exists(os.path.join(out, "final"))
    kept = [n for n in os.listdir(out) if n.startswith("ckpt-")]
    assert kept                                 # the run went on saving, keep_ckpts of them
    for n in kept:                              # all unreadable: refused with the fix
        open(os.path.join(out, n, "model.safetensors"), "wb").write(b"garbage")
    r = run_script("distill.py", cfg, extra=["--resume=True", "--max_steps=8"], check=False)
    clean_error(r, "can be read", "--resume=False")


@pytest.mark.parametrize("edit,msg", [(lambda c: c.update(hidden_size="256"), "(config.json: hidden_size)"),
                                      (lambda c: c.update(rope_theta=-1.0), "rope_theta=-1.0: must be a number > 0"),
                                      (lambda c: [1, 2], "holds a JSON list")])
def test_a_config_json_of_the_wrong_shape_is_named(tiny, tmp_path, edit, msg):
    import shutil
    shutil.copytree(tiny / "teacher", tmp_path / "m")
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    cfg = edit(cfg) or cfg
    json.dump(cfg, open(tmp_path / "m" / "config.json", "w"))
    clean_error(run(["evaluate.py", f"--model={tmp_path / 'm'}", "--tasks="]), "config.json", msg)


def test_an_evaluation_out_that_cannot_be_written_is_refused_before_scoring(tiny, tmp_path):
    """The scores used to be computed, then lost at the write."""
    (tmp_path / "a_file").write_text("mine")
    data = os.path.join(ROOT, "tests", "fixtures", "eval")
    for out, msg in ((tmp_path / "a_file" / "r.json", "Not a directory"), ("/proc/nanomla/r.json", "written")):
        t0 = time.time()
        r = run(["evaluate.py", f"--model={tiny / 'teacher'}", "--tasks=piqa", f"--data_dir={data}", f"--out={out}"])
        clean_error(r, "cannot be written", msg, "Fix: a path on a writable disk")
        assert "piqa: acc" not in r.stdout and time.time() - t0 < 60
    assert (tmp_path / "a_file").read_text() == "mine" and os.listdir(tmp_path) == ["a_file"]


@pytest.mark.parametrize("flag", ["--write_calib", "--out"])
def test_init_ablation_outputs_that_cannot_be_written_are_refused_before_work(tiny, tmp_path, flag):
    (tmp_path / "a_file").write_text("mine")
    r = run(["scripts/init_ablation.py", f"--model={tiny / 'teacher'}", "--budgets=[]", "--calib_sizes=[]",
             f"{flag}={tmp_path / 'a_file' / 'x.jsonl'}"])
    clean_error(r, "cannot be written", "Not a directory")
    assert "held-out" not in r.stdout and (tmp_path / "a_file").read_text() == "mine"
