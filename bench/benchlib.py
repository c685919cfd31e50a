"""Helpers shared by the bench scripts: environment, mpirun command lines, timed runs with peak RSS, JSON out.

Not a benchmark itself (``hpc-dfs bench`` runs only ``bench_*.py``).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = REPO / "bench" / "results"
LABELS = REPO.parent / "shared" / "data" / "kits19" / "labels"
KITS_JSON = REPO.parent / "shared" / "data" / "kits19" / "kits.json"
#: KiTS19 cases of 59-85 slices at 512x512 (real labels; CT rendered around them by ``hpc-dfs synth``)
CASES = ("case_00004", "case_00007", "case_00009", "case_00011", "case_00015", "case_00024")


def env(**extra: str) -> dict:
    """The environment every timed command gets: one thread per process, unbuffered, our venv first on PATH."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = f"{REPO}{os.pathsep}{e['PYTHONPATH']}" if e.get("PYTHONPATH") else str(REPO)
    e.update(extra)
    return e


def mpirun(np_: int, argv: list[str]) -> list[str]:
    """``mpirun -np N`` (np=1 too, so that both pay the same launch cost) around ``argv``."""
    return [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_),
            "-x", "PATH", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", "-x", "PYTHONUNBUFFERED", *argv]


def hpc(*args: str) -> list[str]:
    """``python -m hpc_dfs ARGS`` with this interpreter."""
    return [sys.executable, "-m", "hpc_dfs", *args]


def timed(cmd: list[str], cwd: Path = REPO, env_: dict | None = None, poll_s: float = 0.05) -> dict:
    """Run ``cmd``; wall seconds and the peak RSS of its process tree (largest process and the sum).

    Raises:
        SystemExit: the command failed (its output is shown).
    """
    import psutil

    t = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=cwd, env=env_ or env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_one = peak_sum = 0
    out_chunks: list[str] = []
    import threading

    def drain(stream, sink):
        sink.append(stream.read())
    err_chunks: list[str] = []
    threads = [threading.Thread(target=drain, args=(proc.stdout, out_chunks)),
               threading.Thread(target=drain, args=(proc.stderr, err_chunks))]
    for th in threads:
        th.start()
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [proc, *proc.children(recursive=True)]]
        except psutil.Error:
            rss = []
        if rss:
            peak_one, peak_sum = max(peak_one, max(rss)), max(peak_sum, sum(rss))
        time.sleep(poll_s)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    out, err = "".join(out_chunks), "".join(err_chunks)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_MB_max_process": round(peak_one / 1e6, 1),
            "peak_rss_MB_tree": round(peak_sum / 1e6, 1), "stdout": out, "stderr": err}


def synth_cases(out: Path, cases: tuple[str, ...] = CASES) -> Path:
    """CT rendered around real KiTS19 labels at native size (``hpc-dfs synth --from-labels``), once."""
    if not (out / "kits.json").exists():
        subprocess.run(hpc("synth", "--from-labels", str(LABELS), "--kits-json", str(KITS_JSON),
                           "--cases", ",".join(cases), "--out", str(out), "--no-progress"),
                       check=True, env=env(), cwd=REPO, capture_output=True)
    return out


def machine() -> dict:
    """The machine the figures were taken on (the load average says how shared it was)."""
    return {"cpus": os.cpu_count(), "gpu": None, "platform": platform.platform(), "python": platform.python_version(),
            "load_avg_at_end": [round(v, 2) for v in os.getloadavg()]}


def write_result(name: str, result: dict, out_dir: Path = RESULTS) -> Path:
    """Write ``out_dir/<name>.json`` atomically (``hpc_dfs.fsutil``), with the machine and the time."""
    sys.path.insert(0, str(REPO))
    from hpc_dfs.fsutil import write_json

    result = {**result, "machine": machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    write_json(path, result)
    return path
