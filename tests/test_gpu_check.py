"""scripts/gpu_check.py, the GPU's first contact (issue 36), in its CPU dry run: every check's code path runs on tiny
shapes and passes, the table and the JSON are written, and its scratch folder is removed. (On a GPU the same script
runs the real shapes; that has not been run yet: no GPU was lent when it was written.)"""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_dry_run_passes_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry_run=True", f"--out={out}",
                        f"--scratch={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = json.load(open(out))["checks"]
    assert [c["check"] for c in checks] == ["parity", "decode", "distill", "dpo", "svd_init", "mamba2", "export",
                                            "evaluate"]
    assert all(c["passed"] is True for c in checks), [(c["check"], c["number"]) for c in checks]
    assert "| evaluate | pass |" in r.stdout
    assert not [n for n in os.listdir(tmp_path) if n.startswith("gpu_check-")]   # the scratch folder is gone
