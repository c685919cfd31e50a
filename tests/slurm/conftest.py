"""A live one-node SLURM cluster for the tests in this folder (``pytest tests/slurm -m slurm``).

The session fixture :func:`slurm` runs ``tests/slurm/cluster.sh start DIR`` (installing Debian's
slurm-wlm and munge with apt-get when they are missing), hands the tests a :class:`Cluster` to submit
and watch jobs with, and at the end runs ``cluster.sh stop DIR`` and checks that every daemon it
started (munged, slurmctld, slurmd, and any slurmstepd of its jobs) is gone.

Every wait is bounded: a job that outlives its deadline is cancelled and the test fails with the
job's logs, so a hung job can never hang CI.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.launch import BIN, REPO

CLUSTER_SH = Path(__file__).with_name("cluster.sh")
START_TIMEOUT = 900     # includes a first apt-get install
STOP_TIMEOUT = 120
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"}


@dataclass
class Cluster:
    """Handle on the running test cluster: its state dir and the environment its clients need."""

    dir: Path
    env: dict = field(default_factory=dict)
    pids: dict = field(default_factory=dict)

    def run(self, *cmd, timeout: float = 60, check: bool = True, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a client command (sbatch, squeue, sacct, ...) against this cluster."""
        full_env = dict(self.env, **(env or {}))
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=full_env,
                             cwd=cwd or REPO)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def job_field(self, job_id: str, name: str) -> str:
        """One field of ``scontrol show job`` (e.g. JobState, Restarts, ExitCode)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for tok in out.split():
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
        return ""

    def states(self, job_ids) -> dict[str, str]:
        """Current JobState of each job (from slurmctld; MinJobAge keeps finished jobs listed)."""
        return {j: self.job_field(j, "JobState") for j in job_ids}

    def wait(self, job_ids, timeout: float, logs: Path | None = None, until=None) -> dict[str, str]:
        """Poll until no job is active (or ``until(states)`` is true); on timeout cancel them and fail."""
        job_ids = [str(j) for j in job_ids]
        deadline = time.monotonic() + timeout
        while True:
            st = self.states(job_ids)
            if until is not None and until(st):
                return st
            if until is None and all(s and s not in ACTIVE_STATES for s in st.values()):
                return st
            if time.monotonic() > deadline:
                self.run("scancel", *job_ids, check=False)
                pytest.fail(f"jobs {job_ids} still {st} after {timeout:.0f} s; cancelled.\n{self.dump_logs(logs)}")
            time.sleep(1.0)

    def sacct(self, job_ids) -> dict[str, list[tuple[str, str]]]:
        """Finished runs per job from ``sacct -c`` (the job completion log): [(State, ExitCode), ...].

        A requeued job has one record per run; the run that was requeued is logged with the state the
        job had right after the requeue (PENDING), the last run with its final state.
        """
        out = self.run("sacct", "-c", "-n", "-P", "-o", "JobID,State,ExitCode", "-j",
                       ",".join(map(str, job_ids))).stdout
        runs: dict[str, list[tuple[str, str]]] = {str(j): [] for j in job_ids}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] in runs:
                runs[parts[0]].append((parts[1], parts[2]))
        return runs

    def dump_logs(self, logs: Path | None, tail: int = 60) -> str:
        """The last lines of every log under ``logs`` plus the daemons' logs, for failure messages."""
        chunks = []
        files = sorted(logs.rglob("*.out")) + sorted(logs.rglob("*.log")) if logs and logs.exists() else []
        files += [self.dir / "log" / "slurmctld.log", self.dir / "log" / "slurmd.log"]
        for f in files:
            if f.is_file():
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                chunks.append(f"----- {f}\n" + "\n".join(lines))
        return "\n".join(chunks)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _stepds_of(cluster_dir: Path) -> list[int]:
    """slurmstepd processes that belong to this cluster (they hold files under its dir)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if (p / "comm").read_text().strip() != "slurmstepd":
                continue
            if any(str(cluster_dir) in os.readlink(fd) for fd in (p / "fd").iterdir()):
                found.append(int(p.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="session")
def slurm():
    """Start the one-node cluster once per session; stop it (and check nothing is left) at the end."""
    have = all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch"))
    why = None
    if os.geteuid() != 0:
        why = "the test cluster runs slurmd and munged as root; run the SLURM tests as root (CI does)"
    elif not have and not shutil.which("apt-get"):
        why = "SLURM is not installed and apt-get is missing to install it"
    if why:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why)
    cluster_dir = Path(tempfile.mkdtemp(prefix="hpcdfs-slurm.", dir="/tmp"))
    env = dict(os.environ)
    env["SLURM_CONF"] = str(cluster_dir / "slurm.conf")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # never inherit an outer SLURM job's settings
    for k in list(env):
        if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
            del env[k]
    res = subprocess.run([str(CLUSTER_SH), "start", str(cluster_dir)], capture_output=True, text=True,
                         timeout=START_TIMEOUT, env=env)
    pids = {}
    for name in ("munged", "slurmctld", "slurmd"):
        f = cluster_dir / "run" / f"{name}.pid"
        if f.exists() and f.read_text().strip().isdigit():
            pids[name] = int(f.read_text().strip())
    cluster = Cluster(cluster_dir, env, pids)
    try:
        if res.returncode != 0:
            pytest.fail(f"cluster.sh start failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n"
                        f"{cluster.dump_logs(None)}")
        assert set(pids) == {"munged", "slurmctld", "slurmd"}, f"missing PID files: {pids}"
        yield cluster
    finally:
        stop = subprocess.run([str(CLUSTER_SH), "stop", str(cluster_dir)], capture_output=True, text=True,
                              timeout=STOP_TIMEOUT, env=env)
        left = {n: p for n, p in pids.items() if _alive(p)}
        stepds = _stepds_of(cluster_dir)
        if stop.returncode == 0 and not left and not stepds and not os.environ.get("HPC_DFS_KEEP_SLURM"):
            shutil.rmtree(cluster_dir, ignore_errors=True)
        assert stop.returncode == 0, f"cluster.sh stop failed:\n{stop.stdout}\n{stop.stderr}"
        assert not left, f"daemons still running after cluster.sh stop: {left}"
        assert not stepds, f"slurmstepd processes of the test cluster still running: {stepds}"
