"""Training throughput at np=1 and np=2 (weak scaling), allreduce bytes and time, and the scaling model.

    .venv/bin/python bench/bench_train.py [--quick] [--slice 64] [--cases 16] [--batch 16] [--steps 8]
                                          [--base-channels 8] [--norms instance,batch] [--repeats 3]

Weak scaling: the same per-rank batch at np=1 and np=2 (so the global batch doubles), one thread
per rank, real ``hpc-dfs train`` jobs under ``mpirun`` on shards from ``hpc-dfs synth`` +
``preprocess``. Throughput is read from the second epoch of each run's ``metrics.jsonl`` (the first
pays for start-up and page cache). The machine is shared, so np=1 and np=2 runs are interleaved
``--repeats`` times and the best of each is compared (the median ratio is reported too). Goal: np=2
>= 1.8x np=1 samples/s.

Also measured:

- the gradient size S (fp32 bytes of the trainable parameters) and a bare ``parallel.allreduce`` of S
  bytes at np=2 (median of 20, after 3 warm-ups), i.e. the ring-allreduce time per step;
- each run's share of step time spent waiting for allreduce (``allreduce_frac``: the loss-statistics
  allreduce plus ``optimizer.synchronize()``, i.e. the communication not hidden behind backward).

SyncBatchNorm note: with ``norm=batch`` every BatchNorm layer adds two small blocking allreduces
(forward statistics and their backward) per step; on CPU with Horovod's cycle time these dominate a
tiny model, so both norms are measured. Then ``bench/scaling_model.py`` is run with the measured
compute time. Writes ``bench/results/train.json`` and ``bench/results/scaling_model.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

PY = sys.executable


def _run(cmd: list, np: int = 1, timeout: float = 1800) -> str:
    prefix = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np), "-x", "OMP_NUM_THREADS",
              "-x", "PATH"] if np > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(prefix + [str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(map(str, cmd))}\n{res.stdout}\n{res.stderr}")
    return res.stdout + res.stderr


def allreduce_worker(nbytes: int) -> None:
    """Run under mpirun: time parallel.allreduce of ``nbytes`` (fp32) and print JSON on rank 0."""
    import torch

    from hpc_dfs import parallel
    parallel.init()
    torch.set_num_threads(1)
    t = torch.ones(max(1, nbytes // 4))
    times = []
    for i in range(23):
        parallel.barrier()
        t0 = time.perf_counter()
        parallel.allreduce(t, op="mean", name=f"bench.{i}")
        times.append(time.perf_counter() - t0)
    if parallel.is_main():
        print("RESULT " + json.dumps({"bytes": nbytes, "median_s": statistics.median(times[3:]),
                                      "min_s": min(times[3:])}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller run (CI)")
    p.add_argument("--slice", type=int, default=64)
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="per-rank batch")
    p.add_argument("--steps", type=int, default=8, help="steps per epoch (2 epochs; the second is timed)")
    p.add_argument("--base-channels", type=int, default=8)
    p.add_argument("--norms", default="instance,batch")
    p.add_argument("--repeats", type=int, default=3, help="interleaved np=1/np=2 pairs per norm")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    p.add_argument("--allreduce-worker", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.allreduce_worker is not None:
        allreduce_worker(a.allreduce_worker)
        return 0
    if a.quick:
        a.cases, a.steps, a.norms, a.repeats = 8, 3, "instance", 1

    from hpc_dfs.fsutil import write_json
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        _run([PY, "-m", "hpc_dfs", "synth", "--out", tmp / "data", "--cases", a.cases, "--seed", 0, "--size",
              max(32, a.slice)])
        _run([PY, "-m", "hpc_dfs", "preprocess", "--data", tmp / "data", "--out", tmp / "shards", "--slice-size",
              f"{a.slice},{a.slice}", "--n-folds", 4])
        manifest = json.loads((tmp / "shards" / "manifest.json").read_text())
        n_clinical = manifest["clinical"]["n_features"]
        for norm in a.norms.split(","):
            for rep in range(a.repeats):          # interleaved, so a busy spell hurts both sides alike
                for np_ in (1, 2):
                    out = tmp / f"run_{norm}_{np_}_{rep}"
                    load = os.getloadavg()[0]
                    _run([PY, "-m", "hpc_dfs", "train", "--shards", tmp / "shards", "--out", out, "--epochs", 2,
                          "--steps-per-epoch", a.steps, "--batch-size", a.batch, "--num-workers", 0, "--set",
                          f"model.base_channels={a.base_channels}", "--set", f"model.norm={norm}", "--log-every",
                          10_000], np=np_)
                    row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
                    results.append({"norm": norm, "np": np_, "repeat": rep, "global_batch": a.batch * np_,
                                    "samples_per_s": row["samples_per_s"],
                                    "samples_per_s_per_rank": row["samples_per_s_per_rank"],
                                    "step_s": row["step_s"], "allreduce_frac": row["allreduce_frac"],
                                    "allreduce_s_per_step": row["allreduce_s_per_step"], "loadavg_1min": load})
                    print(json.dumps(results[-1]), flush=True)

        import torch
        from hpc_dfs.models import build_model, count_parameters
        params = count_parameters(build_model("dfs_fusion", n_clinical=n_clinical, base_channels=a.base_channels))
        grad_bytes = 4 * params
        out = _run([PY, __file__, "--allreduce-worker", grad_bytes], np=2)
        bare = json.loads(next(line for line in out.splitlines() if "RESULT " in line).split("RESULT ", 1)[1])

    speedups, best = {}, {}
    for norm in a.norms.split(","):
        for np_ in (1, 2):   # best of the repeats: the least disturbed by other jobs on the machine
            best[(norm, np_)] = max((r for r in results if r["norm"] == norm and r["np"] == np_),
                                    key=lambda r: r["samples_per_s"])
        speedups[norm] = {"best_of_repeats": best[(norm, 2)]["samples_per_s"] / best[(norm, 1)]["samples_per_s"],
                          "median_of_repeats": statistics.median(
                              r2["samples_per_s"] / r1["samples_per_s"] for r1, r2 in zip(
                                  [r for r in results if r["norm"] == norm and r["np"] == 1],
                                  [r for r in results if r["norm"] == norm and r["np"] == 2]))}
    first = best[(a.norms.split(",")[0], 1)]
    report = {
        "what": "hpc-dfs train weak scaling on this machine (real mpirun jobs, 1 thread per rank)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "settings": {"slice": a.slice, "cases": a.cases, "batch_per_rank": a.batch, "steps_timed": a.steps,
                     "model": f"dfs_fusion base_channels={a.base_channels}", "params": params},
        "results": results, "speedup_np2_over_np1": speedups, "goal": ">= 1.8",
        "best": {f"{n}/np{p}": r for (n, p), r in best.items()},
        "allreduce": {"grad_bytes": grad_bytes, "bare_allreduce_np2": bare},
        "scaling_input": {"t_compute_s": first["step_s"], "grad_bytes": grad_bytes, "params": params,
                          "note": f"np=1 step time of {a.batch} slices of {a.slice}x{a.slice} on one CPU thread"},
    }
    write_json(a.out, report)
    print(json.dumps({"speedup_np2_over_np1": speedups, "allreduce": report["allreduce"]}, indent=1))
    import scaling_model  # noqa: E402  (bench/ is on sys.path as the script's folder)
    scaling_model.main(["--from", str(a.out)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
