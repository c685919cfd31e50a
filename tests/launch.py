"""Helpers for tests that launch real multi-process jobs (mpirun, horovodrun --gloo, torchrun, plain).

    from tests.launch import launch, hpc_dfs_cmd
    res = launch(hpc_dfs_cmd("preprocess", "--data", d, "--out", s), np=2, launcher="mpirun")
    assert res.returncode == 0, res.output

``launcher="torchrun"`` runs ``torchrun --standalone`` (a free rendezvous port per job, so parallel test runs
never meet) and ``python -m hpc_dfs`` becomes ``torchrun ... -m hpc_dfs``, the command a user types.
``launcher="mpirun-torch"`` is mpirun with ``HPC_DFS_ENGINE=torch`` (the torch engine under Open MPI).

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
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KITS19 = SHARED / "data" / "kits19"
UCI_CKD = SHARED / "data" / "uci_ckd"
BIN = Path(sys.executable).parent
LAUNCHERS = ("mpirun", "horovodrun", "torchrun", "mpirun-torch")
#: the engine each launcher starts (train; the object-only stages use mpi4py under mpirun either way)
ENGINE = {"mpirun": "horovod", "horovodrun": "horovod", "torchrun": "torch", "mpirun-torch": "torch", "none": "horovod"}


def horovod_missing() -> str | None:
    """Why the tests marked ``horovod`` cannot run here (None: Horovod is installed)."""
    if find_spec("horovod") is None:
        return ("needs Horovod, which this environment lacks (set up with ENGINE=torch make setup; "
                "`make setup` builds it)")
    return None


def engine_params(*rows, train: bool = True) -> list:
    """Parametrize rows, each marked ``horovod`` when it runs the Horovod engine (skipped where Horovod is missing).

    Args:
        rows: a launcher name (see :data:`ENGINE`) or an engine name (horovod, torch), or a tuple with such names.
        train: whether the command trains; the other stages need Horovod only under horovodrun.
    """
    out = []
    for row in rows:
        values = row if isinstance(row, tuple) else (row,)
        needs = any(v in ("horovodrun", "horovod") or (train and ENGINE.get(v) == "horovod" and v != "none")
                    for v in values if isinstance(v, str))
        out.append(pytest.param(*values, marks=pytest.mark.horovod) if needs else pytest.param(*values))
    return out


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
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(np)]
    if launcher in ("mpirun", "mpirun-torch"):
        mpirun = shutil.which("mpirun") or "mpirun"
        return [mpirun, "--allow-run-as-root", "--oversubscribe", "--tag-output", "-np", str(np),
                "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED"]
    if launcher == "horovodrun":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"]
    if launcher == "none":
        return []
    raise ValueError(launcher)


def command(cmd: list, launcher: str, np: int) -> list[str]:
    """The full command line of ``cmd`` under ``launcher`` (torchrun takes ``-m module``, not the interpreter)."""
    cmd = [str(c) for c in cmd]
    if launcher == "torchrun" and cmd[:1] == [sys.executable]:
        cmd = cmd[1:]
    return launcher_prefix(launcher, np) + cmd


def launcher_env(launcher: str, env: dict | None = None) -> dict:
    """``env`` plus what the launcher's engine needs (``HPC_DFS_ENGINE=torch`` for mpirun-torch)."""
    out = dict(env or {})
    if launcher == "mpirun-torch":
        out.setdefault("HPC_DFS_ENGINE", "torch")
    return out


def launch(cmd: list, np: int = 2, launcher: str = "mpirun", timeout: float = 300, env: dict | None = None,
           cwd: str | Path | None = None) -> Result:
    """Run ``cmd`` under ``launcher`` with ``np`` ranks (launcher 'none' = one plain process)."""
    full = command(cmd, launcher, np)
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=job_env(launcher_env(launcher, env)), cwd=cwd or REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return Result(proc.returncode, out)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return Result(-9, (out or "") + f"\n[launch] TIMEOUT after {timeout}s: {' '.join(full)}", True)
