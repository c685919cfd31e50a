"""bench/gpu.sh: --dry-run runs every part on CPU (step rate, reader, horovodrun training); a real run needs CUDA."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.launch import REPO, job_env

MODELS = {"rusp_net_dw", "dfs_fusion", "unet"}


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=540, env=job_env({"PYTHON": sys.executable}))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["device"] == "cpu"
    rows = r["steps"]
    assert {(x["model"], x["precision"]) for x in rows} == {(m, p) for m in MODELS for p in ("fp32", "bf16")}
    assert all(x["steps_per_s"] > 0 and x["reader_over_step"] > 0 for x in rows), rows
    rd = r["reader"]["32"]
    assert rd["slices_per_s_one_process"] > 0 and rd["slices_per_s_dataloader"] > 0
    train = r["horovodrun_train"]
    assert train["rc"] == 0 and train["steps"] == 2 and "horovodrun -np 1 -H localhost:1" in train["command"]
    assert " train --shards " in train["command"] and "amp=auto" in train["command"]
    assert train["device_line"] and " on cpu" in train["device_line"]
    assert r["syncbn_class"] and r["environment"]["torch"] == torch.__version__


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")
def test_without_cuda_gpu_sh_refuses_and_bench_all_skips(tmp_path):
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--out", str(tmp_path / "g.json")], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=job_env({"PYTHON": sys.executable}))
    assert res.returncode == 4, res.stderr
    assert "no CUDA device" in res.stderr and "--dry-run" in res.stderr and not (tmp_path / "g.json").exists()
    res = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--quick", "--out",
                          str(tmp_path / "g.json")], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=job_env())
    assert res.returncode == 0 and "skipped: no CUDA device" in res.stdout and not (tmp_path / "g.json").exists()
