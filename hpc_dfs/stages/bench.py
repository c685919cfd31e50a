"""Run the benchmarks in ``bench/`` and collect their JSON results.

    hpc-dfs bench --list
    hpc-dfs bench --all
    hpc-dfs bench preprocess reader train

Each benchmark is a script ``bench/bench_<name>.py`` that measures one thing against a floor or a
peer *in the same run* (ratios, not absolute timings, are the figures to compare across machines)
and writes ``bench/results/<name>.json``. Benchmarks that need several ranks launch ``mpirun``
themselves. This verb only discovers and runs them, one after the other, so that they do not compete
for cores.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from hpc_dfs.log import get_logger

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def available(bench_dir: Path = BENCH_DIR) -> dict[str, Path]:
    return {p.stem[len("bench_"):]: p for p in sorted(bench_dir.glob("bench_*.py"))}


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="*", help="benchmarks to run (see --list)")
    parser.add_argument("--all", action="store_true", help="run every benchmark in bench/")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help="folder of bench_*.py scripts")
    parser.add_argument("--quick", action="store_true", help="pass --quick to each benchmark (smaller sizes)")


def main(args) -> int:
    log = get_logger("hpc_dfs.bench")
    found = available(args.bench_dir)
    if args.list or not (args.all or args.names):
        for name, path in found.items():
            doc = (path.read_text().split('"""')[1].strip().splitlines() or [""])[0] if '"""' in path.read_text() else ""
            print(f"{name:12s} {doc}")
        return 0 if args.list else 2
    names = list(found) if args.all else args.names
    unknown = [n for n in names if n not in found]
    if unknown:
        log.error("unknown benchmark(s) %s; available: %s", ", ".join(unknown), ", ".join(found))
        return 2
    failed = []
    for name in names:
        cmd = [sys.executable, str(found[name])] + (["--quick"] if args.quick else [])
        log.info("running %s: %s", name, " ".join(cmd))
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=found[name].parent.parent)
        log.info("%s finished in %.1f s with exit status %d", name, time.perf_counter() - t0, rc)
        if rc != 0:
            failed.append(name)
    results = args.bench_dir / "results"
    for p in sorted(results.glob("*.json")):
        try:
            keys = ", ".join(list(json.loads(p.read_text()))[:6])
        except (OSError, ValueError) as e:
            keys = f"unreadable: {e}"
        print(f"{p}: {keys}")
    if failed:
        log.error("benchmarks failed: %s", ", ".join(failed))
        return 1
    return 0
