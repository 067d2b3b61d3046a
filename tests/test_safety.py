"""What a run may touch and when it must fail: output folders it did not write are never replaced, one run per
out_dir (a dead run's lock does not block), every setting and the tokenizer checked before any work (nothing moved
aside), resume refuses a changed model, SIGINT / SIGTERM / a killed launcher stop with a checkpoint, --help."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, byte_teacher_and_sft, random_model, read_log, run_script, tiny_config, write_config
from folders import check_replaceable
from model import Transformer
from tokenizer import Tokenizer
from trainer import latest_checkpoint


# --- save_pretrained never deletes what it did not write

def test_save_refuses_a_folder_it_did_not_write(tmp_path):
    m = random_model(tiny_config())
    target = tmp_path / "checkout"
    target.mkdir()
    (target / "sentinel.txt").write_text("mine")
    (target / ".git").mkdir()
    (target / ".git" / "HEAD").write_text("ref")
    with pytest.raises(FileExistsError, match="not written by this project"):
        m.save_pretrained(target)
    assert (target / "sentinel.txt").read_text() == "mine" and (target / ".git" / "HEAD").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]            # no temporary folder left either


def test_save_replaces_its_own_folder_but_not_added_files(tmp_path):
    m = random_model(tiny_config())
    m.save_pretrained(tmp_path / "m", tokenizer=Tokenizer.byte_level())
    written = json.load(open(tmp_path / "m" / "WRITTEN_BY.json"))["files"]
    assert "model.safetensors" in written and "tokenizer_bytes.json" in written
    m.save_pretrained(tmp_path / "m")                                         # its own files only: replaced
    (tmp_path / "m" / "notes.md").write_text("a user's notes")
    with pytest.raises(FileExistsError, match="holds files this project did not write.*notes.md"):
        m.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "notes.md").exists()
    check_replaceable(str(tmp_path / "empty"))                                # absent: fine
    (tmp_path / "empty").mkdir()
    check_replaceable(str(tmp_path / "empty"))                                # empty: fine


def test_svd_init_out_dir_dot_is_refused(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "svd_init.py"), "--out_dir=."], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "contains the input init_from" in r.stderr and "Traceback" not in r.stderr
    assert os.path.exists(os.path.join(ROOT, "README.md")) and os.path.exists(os.path.join(ROOT, ".git"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "svd_init.py"), "--out_dir=/"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # decided from the top level, no walk of /
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "contains the input init_from" in r.stderr or "was not written by this project" in r.stderr, r.stderr


# --- training runs: a shared set-up

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return byte_teacher_and_sft(tmp_path_factory.mktemp("safety"))


def cfg_of(setup, name, **over):
    cfg = dict(init_from=str(setup / "teacher"), q_rank=32, kv_rank=8, qk_nope_dim=8, qk_rope_dim=8,
               sft_data=[str(setup / "sft.json")], data_cache=str(setup / f"cache-{name}"), val_every=10, seq_len=32,
               micro_batch=2, tokens_per_step=128, max_steps=4, lr=3e-3, kl_chunk=24, log_every=1, eval_every=100,
               eval_batches=2, ckpt_every=2, out_dir=str(setup / name))
    cfg.update(over)
    return write_config(setup / f"{name}.py", **cfg), cfg["out_dir"]


def test_lock_one_run_per_out_dir(setup):
    cfg, out = cfg_of(setup, "locked")
    os.makedirs(out)
    with open(os.path.join(out, ".lock"), "w") as f:
        f.write(f"{os.getpid()}@{os.uname().nodename}\n")                   # a live process holds it
    t0 = time.time()
    r = run_script("distill.py", cfg, check=False)
    assert r.returncode != 0 and "is in use by another run" in r.stderr and time.time() - t0 < 60
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(os.path.join(out, ".lock"), "w") as f:
        f.write(f"{dead.stdout.strip()}@{os.uname().nodename}\n")          # its process is gone: stale
    run_script("distill.py", cfg)
    assert os.path.exists(os.path.join(out, "final")) and not os.path.exists(os.path.join(out, ".lock"))


@pytest.mark.parametrize("bad,msg", [
    (dict(kv_rank=10_000), "kv_rank=10000 must be an integer"),
    (dict(tokenizer="llama3"), "more ids than the student's embedding (512)"),
    (dict(sft_data=["nope/missing.json"]), "data file 'nope/missing.json' not found"),
    (dict(tokens_per_step=100), "must be a multiple of micro_batch"),
    (dict(out_dir=ROOT), "holds files a distill run does not write"),
])
def test_preflight_fails_fast_and_moves_nothing(setup, bad, msg):
    cfg, out = cfg_of(setup, "earlier", max_steps=2)
    if not os.path.exists(os.path.join(out, "final")):
        run_script("distill.py", cfg)                                         # an earlier, finished run
    before = sorted(os.listdir(out))
    cache = str(setup / "cache-earlier")
    n_caches = len(os.listdir(cache))
    bad_cfg, _ = cfg_of(setup, "earlier", max_steps=2, **bad)
    t0 = time.time()
    r = run_script("distill.py", bad_cfg, check=False)
    assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
    assert time.time() - t0 < 60
    assert sorted(os.listdir(out)) == before                                  # nothing moved aside
    assert len(os.listdir(cache)) == n_caches                                 # nothing tokenised


def test_a_teacher_with_another_tokenizer_is_refused(setup):
    other = random_model(tiny_config(vocab_size=512, bos_id=256, eos_id=(257,), max_seq_len=128))
    other.save_pretrained(setup / "llama3_teacher", tokenizer=Tokenizer.llama3())   # same vocabulary size, other ids
    cfg, _ = cfg_of(setup, "mixed", teacher=str(setup / "llama3_teacher"))
    r = run_script("distill.py", cfg, check=False)
    assert r.returncode != 0 and "uses the tokenizer llama3" in r.stderr
    # the exported student records the run's tokenizer
    cfg, out = cfg_of(setup, "records", max_steps=2)
    run_script("distill.py", cfg)
    assert Tokenizer.from_pretrained(os.path.join(out, "final")).fingerprint() == Tokenizer.byte_level().fingerprint()


def test_no_config_is_not_a_silent_self_distillation():
    r = subprocess.run([sys.executable, "distill.py", "--max_steps=1", "--out_dir=/nonexistent/x"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "nothing to distil" in r.stderr


def test_resume_refuses_a_changed_model_and_warns_on_a_changed_schedule(setup):
    cfg, out = cfg_of(setup, "resumed", max_steps=2)
    run_script("distill.py", cfg)
    r = run_script("distill.py", cfg, extra=["--resume=True", "--kv_rank=16"], check=False)
    assert r.returncode != 0 and "kv_rank 8 -> 16" in r.stderr
    r = run_script("distill.py", cfg, extra=["--resume=True", "--max_steps=4"])
    assert "the schedule changed since the checkpoint: max_steps 2 -> 4" in r.stdout and "(step 2)" in r.stdout
    assert read_log(out, "distill", "train")[-1]["step"] == 4


def test_resume_true_needs_a_checkpoint_and_auto_starts_fresh(setup):
    cfg, out = cfg_of(setup, "auto", max_steps=2)
    r = run_script("distill.py", cfg, extra=["--resume=True"], check=False)
    assert r.returncode != 0 and "holds no complete checkpoint" in r.stderr
    run_script("distill.py", cfg, extra=["--resume=auto"])                   # nothing there: a fresh run
    r = run_script("distill.py", cfg, extra=["--resume=auto", "--max_steps=3"])   # then: resumes it
    assert "(step 2)" in r.stdout


def _start(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    for _ in range(600):                                                      # until a step has been logged
        if os.path.exists(os.path.join(out, "distill.jsonl")) and read_log(out, "distill", "train"):
            return p
        time.sleep(0.2)
    p.kill()
    raise AssertionError(p.stdout.read())


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "kill -9 torchrun"])
def test_a_signal_stops_at_a_step_with_a_checkpoint(setup, how):
    name = how.split()[0].replace("-", "")
    cfg, out = cfg_of(setup, f"sig-{name}", max_steps=100_000, ckpt_every=100_000)
    if how.startswith("kill"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "distill.py", cfg]
    else:
        cmd = [sys.executable, "distill.py", cfg]
    p = _start(cmd, out)
    if how.startswith("kill"):
        p.send_signal(signal.SIGKILL)                                         # the launcher dies, unannounced
    else:
        p.send_signal(getattr(signal, how))
    text = p.communicate(timeout=120)[0]
    if how.startswith("kill"):
        deadline = time.time() + 60
        while time.time() < deadline and subprocess.run(["pgrep", "-f", cfg], capture_output=True).stdout:
            time.sleep(0.5)
        assert not subprocess.run(["pgrep", "-f", cfg], capture_output=True).stdout   # no orphan trains on
        text = open(os.path.join(out, "distill.txt")).read()
        assert "stopped by SIGTERM" in text
    else:
        assert p.returncode == 128 + getattr(signal, how) and "Traceback" not in text
        assert f"stopped by {how}" in text and "resume with: python distill.py" in text
    assert latest_checkpoint(out) is not None and not os.path.exists(os.path.join(out, ".lock"))


# --- --help everywhere: the settings, their defaults and comments; nothing runs

@pytest.mark.parametrize("script", ["svd_init.py", "distill.py", "dpo.py", "evaluate.py", "model.py", "bench.py",
                                    "data.py", "tokenizer.py"])
def test_help(script):
    t0 = time.time()
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "settings (a config file, then --key=value" in r.stdout
    assert "python " in r.stdout                                              # the commands to run it
    assert time.time() - t0 < 30                                              # bench.py --help is no benchmark
    if script == "distill.py":
        assert "--kv_rank=None (int | None)" in r.stdout and "tokens per chunk of the chunked loss" in r.stdout


def test_misspelt_flags_are_errors():
    for args in (["bench.py", "decode", "--batchs=1"], ["data.py", "--tokenizr=bytes"],
                 ["svd_init.py", "--kv_rank=abc"], ["svd_init.py", "--mla_layers=3"]):
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert ("unknown setting" in r.stderr) == (args[-1] in ("--batchs=1", "--tokenizr=bytes")), r.stderr


def test_disk_check_and_foreign_files_refuse_before_moving_anything(tmp_path):
    from trainer import Dist, prepare_out_dir
    d = Dist(0, 1, 0, None, None)
    out = tmp_path / "run"
    (out / "ckpt-0000002").mkdir(parents=True)
    (out / "ckpt-0000002" / "meta.json").write_text("{}")
    (out / "distill.txt").write_text("an earlier run's log")
    with pytest.raises(OSError, match="GiB free, but the run's checkpoints and export need"):
        prepare_out_dir(str(out), False, d, "distill", need_bytes=10 ** 18)
    assert sorted(os.listdir(out)) == ["ckpt-0000002", "distill.txt"]       # nothing moved, lock released
    (out / "requirements.txt").write_text("not a run's file")
    with pytest.raises(FileExistsError, match="requirements.txt"):
        prepare_out_dir(str(out), False, d, "distill")
    os.remove(out / "requirements.txt")
    assert prepare_out_dir(str(out), "auto", d, "distill") is True           # a checkpoint is there: resume


def test_folder_errors_name_the_file(tmp_path):
    from folders import resolve_checkpoint
    from model import read_model_config
    os.makedirs(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="out/ is a local folder, so it is not a hub id"):
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            resolve_checkpoint("out/nope")
        finally:
            os.chdir(cwd)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="m/config.json is not valid JSON"):
        read_model_config(str(tmp_path / "m"))
    hf = tiny_config().to_hf()
    del hf["hidden_size"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="config.json lacks the field 'hidden_size'"):
        read_model_config(str(tmp_path / "m"))
    random_model(tiny_config()).save_pretrained(tmp_path / "t")
    p = tmp_path / "t" / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])                    # truncated
    with pytest.raises(ValueError, match="model.safetensors cannot be read as safetensors"):
        Transformer.from_pretrained(tmp_path / "t")


def test_a_script_stopped_by_sigterm_stops_its_child(tmp_path):
    """scripts/tiny_ablation.py and zebra_table.py launch training runs through folders.run_child: a SIGTERM to the
    script reaches the child's whole process group, so no run trains on, orphaned, holding its lock."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = (f"import sys; sys.path.insert(0, {ROOT!r}); from folders import run_child; "
              f"run_child([sys.executable, '-c', {child!r}])")
    p = subprocess.Popen([sys.executable, "-c", parent], stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=30)[1]
    assert p.returncode == 1 and "stopped by SIGTERM" in err
    child_pid = int(pid_file.read_text())
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)
