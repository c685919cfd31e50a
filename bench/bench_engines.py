"""The two engines side by side on 2 ranks: allreduce time and bus bandwidth (4 KB-64 MB), DFS training step time.

    .venv/bin/python bench/bench_engines.py [--quick] [--np 2] [--repeats 3] [--device cpu|cuda]

In the same run, on the same machine, interleaved so that a busy spell hurts both alike:

- **allreduce**: ``parallel.allreduce`` (sum, fp32) of 4 KB to 64 MB (x4 per row) under the Horovod engine
  (``mpirun``) and the torch engine (``torchrun``: torch.distributed, Gloo on CPU, NCCL with ``--device cuda``).
  Median of N timed calls after warm-ups, each after a barrier; on CPU Horovod gets the settings that
  ``hpc-dfs train`` gives it (``HOROVOD_CYCLE_TIME=1``, ``OMPI_MCA_mpi_yield_when_idle=1``). Bus bandwidth
  as nccl-tests define it:
  ``bytes / time * 2 (n - 1) / n``;
- **training step**: real ``hpc-dfs train`` jobs at the shapes of ``bench/bench_train.py`` (64x64 slices, batch
  16 per rank, DFS fusion at base width 8, instance norm, 8 steps per epoch; the second epoch is timed:
  ``step_s`` of its ``metrics.jsonl`` row), under ``mpirun`` (Horovod) and ``torchrun`` (torch). The best of
  ``--repeats`` interleaved pairs is compared (the median ratio is reported too). The issue's goal: the torch
  engine within 10% of Horovod's step time on 2 CPU ranks.

Writes ``bench/results/engines.json`` (with the machine and its load average before and after: on a shared
machine the figures mean little when the 1-minute load exceeds the core count). ``--quick`` is a smoke run
(smaller sizes, one repeat) that proves the benchmark works.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402

REPO = benchlib.REPO
ENGINES = ("horovod", "torch")
SIZES = [4096 * 4 ** i for i in range(8)]          # 4 KB, 16 KB, ..., 64 MB


def launch(engine: str, np_: int, argv: list[str]) -> list[str]:
    """``argv`` (a Python command line) on ``np_`` ranks: mpirun for Horovod, torchrun for the torch engine."""
    if engine == "horovod":
        return benchlib.mpirun(np_, argv)
    return [str(benchlib.BIN / "torchrun"), "--standalone", "--nproc_per_node", str(np_), *argv[1:]]


def _run(cmd: list, timeout: float = 3600, **extra: str) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=benchlib.env(**extra),
                         cwd=REPO, timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(map(str, cmd))}\n{res.stdout[-3000:]}\n"
                         f"{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def allreduce_worker(sizes: list[int], device: str, calls: int) -> None:
    """Under a launcher: time ``parallel.allreduce`` of each size; rank 0 prints one RESULT line per size."""
    import torch

    from hpc_dfs import parallel
    parallel.init()
    torch.set_num_threads(1)
    dev = parallel.device() if device == "cuda" else torch.device("cpu")
    for nbytes in sizes:
        t = torch.ones(nbytes // 4, device=dev)
        n = max(5, min(calls, int(calls * 4 * 2 ** 20 / nbytes)))   # fewer calls for the big sizes
        times = []
        for i in range(n + 3):
            parallel.barrier()
            t0 = time.perf_counter()
            parallel.allreduce(t, op="sum", name=f"bench.{nbytes}.{i}")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if parallel.is_main():
            med = statistics.median(times[3:])
            size = parallel.size()
            print("RESULT " + json.dumps({"bytes": nbytes, "calls": n, "median_s": med, "min_s": min(times[3:]),
                                          "algbw_GBps": nbytes / med / 1e9,
                                          "busbw_GBps": nbytes / med / 1e9 * 2 * (size - 1) / size}), flush=True)


def _allreduce(engine: str, np_: int, sizes: list[int], device: str, calls: int) -> list[dict]:
    # on CPU, the settings `hpc-dfs train` gives Horovod and Open MPI (a 1 ms cycle, idle waits that yield)
    extra = {"HOROVOD_CYCLE_TIME": "1", "OMPI_MCA_mpi_yield_when_idle": "1"} if device == "cpu" else {}
    out = _run(launch(engine, np_, [sys.executable, __file__, "--allreduce-worker", "--sizes",
                                    ",".join(map(str, sizes)), "--device", device, "--calls", calls]),
               HPC_DFS_ENGINE=engine, **{k: os.environ.get(k, v) for k, v in extra.items()})
    return [json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines() if "RESULT " in line]


def _train(engine: str, np_: int, shards: Path, out: Path, a: argparse.Namespace) -> dict:
    """One ``hpc-dfs train`` job of 2 epochs; the second epoch's row."""
    _run(launch(engine, np_, benchlib.hpc(
        "train", "--engine", engine, "--shards", str(shards), "--out", str(out), "--epochs", "2", "--steps-per-epoch",
        str(a.steps), "--batch-size", str(a.batch), "--num-workers", "0", "--set",
        f"model.base_channels={a.base_channels}", "--set", f"model.norm={a.norm}", "--log-every", "10000")))
    row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return {k: row[k] for k in ("step_s", "samples_per_s", "allreduce_frac", "allreduce_s_per_step")}


def _train_rows(a: argparse.Namespace, tmp: Path) -> list[dict]:
    _run(benchlib.hpc("synth", "--out", str(tmp / "data"), "--cases", str(a.cases), "--seed", "0", "--size",
                      str(max(32, a.slice))))
    _run(benchlib.hpc("preprocess", "--data", str(tmp / "data"), "--out", str(tmp / "shards"), "--slice-size",
                      f"{a.slice},{a.slice}", "--n-folds", "4"))
    rows = []
    for rep in range(a.repeats):
        for engine in (ENGINES if rep % 2 == 0 else ENGINES[::-1]):   # alternate who goes first
            load = os.getloadavg()[0]
            row = _train(engine, a.np, tmp / "shards", tmp / f"run_{engine}_{rep}", a)
            rows.append({"engine": engine, "repeat": rep, "loadavg_1min": load, **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _summary(allreduce: dict, train: list[dict]) -> dict:
    best = {e: min((r for r in train if r["engine"] == e), key=lambda r: r["step_s"]) for e in ENGINES}
    pairs = [(h["step_s"], t["step_s"]) for h, t in zip([r for r in train if r["engine"] == "horovod"],
                                                         [r for r in train if r["engine"] == "torch"])]
    ratio = best["torch"]["step_s"] / best["horovod"]["step_s"]
    by_size = {}
    for h, t in zip(allreduce["horovod"], allreduce["torch"]):
        by_size[str(h["bytes"])] = {"horovod_s": h["median_s"], "torch_s": t["median_s"],
                                    "torch_over_horovod": t["median_s"] / h["median_s"]}
    return {"step_s_best": {e: best[e]["step_s"] for e in ENGINES}, "torch_over_horovod_step_best": ratio,
            "torch_over_horovod_step_median": statistics.median(t / h for h, t in pairs),
            "within_10_percent": ratio <= 1.10, "allreduce_by_size": by_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 4 KB-1 MB, 8 cases, 3 steps, 1 repeat")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: NCCL for both engines")
    p.add_argument("--calls", type=int, default=50, help="timed allreduces per size (fewer above 4 MB)")
    p.add_argument("--slice", type=int, default=64)
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="per-rank batch")
    p.add_argument("--steps", type=int, default=8, help="steps per epoch (2 epochs; the second is timed)")
    p.add_argument("--base-channels", type=int, default=8)
    p.add_argument("--norm", default="instance")
    p.add_argument("--repeats", type=int, default=3, help="interleaved horovod/torch pairs of training runs")
    p.add_argument("--out", type=Path, default=benchlib.RESULTS / "engines.json")
    p.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.allreduce_worker:
        allreduce_worker(sizes, a.device, a.calls)
        return 0
    if a.quick:
        sizes, a.calls, a.cases, a.steps, a.repeats = SIZES[:5], 10, 8, 3, 1
    load_before = [round(v, 2) for v in os.getloadavg()]
    allreduce = {e: [] for e in ENGINES}
    for rep in range(2):   # two interleaved sweeps per engine; the faster median of each size is kept
        for engine in ENGINES:
            for r in _allreduce(engine, a.np, sizes, a.device, a.calls):
                prev = next((x for x in allreduce[engine] if x["bytes"] == r["bytes"]), None)
                if prev is None:
                    allreduce[engine].append(r)
                elif r["median_s"] < prev["median_s"]:
                    allreduce[engine][allreduce[engine].index(prev)] = r
    with tempfile.TemporaryDirectory(prefix="bench_engines_") as tmp:
        train = _train_rows(a, Path(tmp)) if a.device == "cpu" else []
    import torch
    result = {"what": f"the Horovod and torch engines on {a.np} ranks ({a.device}), in the same run",
              "quick": a.quick, "torch": torch.__version__, "load_avg_before": load_before,
              "settings": {"np": a.np, "device": a.device, "calls": a.calls, "slice": a.slice, "cases": a.cases,
                           "batch_per_rank": a.batch, "steps_timed": a.steps, "norm": a.norm,
                           "model": f"dfs_fusion base_channels={a.base_channels}", "repeats": a.repeats},
              "allreduce": allreduce, "train": train,
              "summary": _summary(allreduce, train) if train else {"allreduce_by_size": None}}
    if a.device == "cuda":
        result["summary"] = {"allreduce_by_size": _summary(allreduce, [{"engine": e, "step_s": 1.0} for e in
                                                                       ENGINES])["allreduce_by_size"]}
    path = benchlib.write_result(a.out.stem, result, a.out.parent)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
