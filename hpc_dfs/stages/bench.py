"""Run the benchmarks in ``bench/`` and collect their JSON results.

    hpc-dfs bench --list
    hpc-dfs bench --all
    hpc-dfs bench preprocess reader train
    hpc-dfs bench quality --eval-data DIR --out OUT   # also score your own KiTS-layout cases with the cascade
    hpc-dfs bench quality --quick --work W --out OUT  # the smoke run (hpc-dfs and nnU-Net rows at one budget)

Each benchmark is a script ``bench/bench_<name>.py`` that measures one thing against a floor or a
peer *in the same run* (ratios, not absolute timings, are the figures to compare across machines)
and writes ``bench/results/<name>.json``. Benchmarks that need several ranks launch ``mpirun``
themselves. This verb only discovers and runs them, one after the other, so that they do not compete
for cores. ``--all`` also writes ``bench/results/bench_all.json``: each benchmark's wall time and
exit status, the total, and the machine (the record behind "``make bench`` takes N minutes").
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from hpc_dfs.config import ConfigError, require_path
from hpc_dfs.log import get_logger

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"  # the repository's bench/, beside hpc_dfs/
#: benchmarks that ``--all`` leaves out, because they take far longer than the others (run them by name)
SEPARATE = ("quality",)


def available(bench_dir: Path = BENCH_DIR) -> dict[str, Path]:
    """The benchmarks of ``bench_dir`` by name: ``bench_<name>.py`` -> ``<name>``."""
    return {p.stem[len("bench_"):]: p for p in sorted(bench_dir.glob("bench_*.py"))}


def add_arguments(parser) -> None:
    """``hpc-dfs bench`` options: benchmark names, ``--all``, ``--list``, ``--bench-dir``, ``--quick``."""
    parser.add_argument("names", nargs="*", help="benchmarks to run (see --list)")
    parser.add_argument("--all", action="store_true",
                        help=f"run every benchmark in bench/ except the long ones ({', '.join(SEPARATE)}: by name)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help="folder of bench_*.py scripts")
    parser.add_argument("--quick", action="store_true", help="pass --quick to each benchmark (smaller sizes)")
    parser.add_argument("--eval-data", type=Path, default=None, metavar="DIR",
                        help="quality only: also predict and score this KiTS-layout folder (images with labels)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="quality only: write quality.json (and eval_data/) here instead of bench/results")
    parser.add_argument("--work", type=Path, default=None, metavar="DIR",
                        help="quality only: its working folder (renders, shards, runs; reused by a second run) "
                             "instead of bench/work_quality")


def _print_list(found: dict[str, Path]) -> None:
    for name, path in found.items():
        text = path.read_text()
        doc = (text.split('"""')[1].strip().splitlines() or [""])[0] if '"""' in text else ""
        print(f"{name:12s} {doc}")


def _print_results(results: Path) -> None:
    for p in sorted(results.glob("*.json")):
        try:
            keys = ", ".join(list(json.loads(p.read_text()))[:6])
        except (OSError, ValueError) as e:
            keys = f"unreadable: {e}"
        print(f"{p}: {keys}")


def _write_run_record(results: Path, runs: list[dict], total_s: float, quick: bool) -> None:
    """``RESULTS/bench_all.json``: what ``hpc-dfs bench --all`` ran, how long each took, on which machine."""
    import os
    import platform

    from hpc_dfs import fsutil

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = {"benchmark": "bench_all", "quick": quick, "runs": runs, "total_wall_s": round(total_s, 1),
              "total_minutes": round(total_s / 60, 1),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "load_avg_at_end": load},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    fsutil.write_json(results / "bench_all.json", record)


def main(args) -> int:
    """Run the named benchmarks one after the other; 1 when any of them failed.

    Raises:
        ConfigError: ``--bench-dir`` is not a folder, no benchmark is named, or a name is unknown (exit code 2).
    """
    log = get_logger("hpc_dfs.bench")
    found = available(require_path(args.bench_dir, "dir", "--bench-dir"))
    if args.list or not (args.all or args.names):
        _print_list(found)
        if args.list:
            return 0
        raise ConfigError("name the benchmarks to run (listed above), or give --all")
    names = [n for n in found if n not in SEPARATE] if args.all else args.names
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(found)}")
    passthrough = [a for flag, v in (("--eval-data", args.eval_data), ("--out", args.out), ("--work", args.work))
                   if v is not None for a in (flag, str(v))]
    if passthrough and names != ["quality"]:
        raise ConfigError("--eval-data, --out and --work belong to the quality benchmark: run "
                          "`hpc-dfs bench quality ...`")
    if args.eval_data is not None:
        require_path(args.eval_data, "dir", "--eval-data")
    failed, runs, t_all = [], [], time.perf_counter()
    for name in names:
        cmd = [sys.executable, str(found[name])] + (["--quick"] if args.quick else []) + passthrough
        log.info("running %s: %s", name, " ".join(cmd))
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=found[name].parent.parent)
        log.info("%s finished in %.1f s with exit status %d", name, time.perf_counter() - t0, rc)
        runs.append({"benchmark": name, "wall_s": round(time.perf_counter() - t0, 1), "exit_status": rc})
        if rc != 0:
            failed.append(name)
    if args.all:
        _write_run_record(args.bench_dir / "results", runs, time.perf_counter() - t_all, args.quick)
    _print_results(args.bench_dir / "results")
    if failed:
        log.error("benchmarks failed: %s", ", ".join(failed))
        return 1
    return 0
