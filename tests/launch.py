"""Helpers for tests that launch real multi-process jobs (mpirun, horovodrun --gloo, plain).

    from tests.launch import launch, hpc_dfs_cmd
    res = launch(hpc_dfs_cmd("preprocess", "--data", d, "--out", s), np=2, launcher="mpirun")
    assert res.returncode == 0, res.output

Each launched job has a hard timeout; on timeout the whole process group is killed and the test fails
with the output so far, so a hung collective can never hang the suite.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KITS19 = SHARED / "data" / "kits19"
UCI_CKD = SHARED / "data" / "uci_ckd"
BIN = Path(sys.executable).parent
LAUNCHERS = ("mpirun", "horovodrun")


@dataclass
class Result:
    returncode: int
    output: str
    timed_out: bool = False


def hpc_dfs_cmd(*args) -> list[str]:
    """The CLI as a command line, run by the same interpreter as the tests."""
    return [sys.executable, "-m", "hpc_dfs", *map(str, args)]


def job_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", "20")
    env.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "40")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def launcher_prefix(launcher: str, np: int) -> list[str]:
    if launcher == "mpirun":
        mpirun = shutil.which("mpirun") or "mpirun"
        return [mpirun, "--allow-run-as-root", "--oversubscribe", "--tag-output", "-np", str(np),
                "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED"]
    if launcher == "horovodrun":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"]
    if launcher == "none":
        return []
    raise ValueError(launcher)


def launch(cmd: list, np: int = 2, launcher: str = "mpirun", timeout: float = 300, env: dict | None = None,
           cwd: str | Path | None = None) -> Result:
    """Run ``cmd`` under ``launcher`` with ``np`` ranks (launcher 'none' = one plain process)."""
    full = launcher_prefix(launcher, np) + [str(c) for c in cmd]
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=job_env(env), cwd=cwd or REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return Result(proc.returncode, out)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return Result(-9, (out or "") + f"\n[launch] TIMEOUT after {timeout}s: {' '.join(full)}", True)
