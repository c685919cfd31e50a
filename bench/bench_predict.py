"""Inference throughput of ``hpc-dfs predict`` at np=1 and np=2 (slices/s, s/case), single stage and cascade.

    .venv/bin/python bench/bench_predict.py [--quick] [--repeats 1] [--out bench/results]

Set-up (not timed): phantoms (``hpc-dfs synth``), preprocessed at 96x96 with stage-2 windows of 64x64
(the demo's settings), and a cascade trained for a few steps (``train --stage both``, DFS fusion at base
width 8, the demo's model). Timed: the whole ``mpirun -np N hpc-dfs predict`` on held-out phantoms
(another seed), once with ``--checkpoint`` only and once with ``--refine-checkpoint`` too, interleaved
np=1 / np=2. Every np=2 output is compared byte for byte with np=1's (every file under the output folder
except logs and timing summaries). Goal: np=2 >= 1.8x np=1 for the whole command, outputs identical.
Every run carries ``phases``: per rank its cases and the wall/CPU seconds of each phase from the process's
start (start-up + imports, parallel init, setup = checkpoints and records, partition, cases, gather, summary),
from the stage's DEBUG line (``HPC_DFS_LOG_LEVEL=DEBUG``). Speed-ups are given for the best runs and for
the medians over the repeats. Writes ``bench/results/predict.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

TRAIN = ["--stage", "both", "--epochs", "1", "--max-steps", "3", "--batch-size", "4", "--num-workers", "0",
         "--set", "model.base_channels=8", "--set", "model.norm=instance", "--seed", "0", "--no-tensorboard"]
REFINE = ["--set", "refine.spacing=auto", "--set", "refine.slice_size=64,64", "--set", "refine.margin_mm=12"]


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, env=benchlib.env(), cwd=benchlib.REPO, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


def setup(tmp: Path, n_train: int, n_test: int, size: int) -> tuple[Path, Path]:
    """Train phantoms -> shards -> a few-step cascade; held-out phantoms. Returns (RUN, test data)."""
    _run(benchlib.hpc("synth", "--out", str(tmp / "data"), "--cases", str(n_train), "--seed", "0",
                      "--size", str(size), "--no-progress"))
    _run(benchlib.hpc("synth", "--out", str(tmp / "test"), "--cases", str(n_test), "--seed", "1",
                      "--first-case", "100", "--size", str(size - 16), "--no-progress"))
    _run(benchlib.hpc("preprocess", "--data", str(tmp / "data"), "--out", str(tmp / "shards"), "--no-progress",
                      "--slice-size", "96,96", *REFINE))
    _run(benchlib.hpc("train", "--shards", str(tmp / "shards"), "--out", str(tmp / "run"), *TRAIN))
    return tmp / "run", tmp / "test"


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every output file, except logs and per-run timing summaries."""
    skip = re.compile(r"(\.log$|summary\.json$|timing|\.html$)")
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not skip.search(p.name)}


def n_slices(test: Path) -> int:
    import nibabel as nib
    return sum(int(nib.load(p).shape[0]) for p in test.glob("case_*/imaging.nii.gz"))


def predict(np_: int, run: Path, test: Path, out: Path, cascade: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    ck = ["--checkpoint", str(run / "locate" / "checkpoints" / "last.pt")]
    if cascade:
        ck += ["--refine-checkpoint", str(run / "refine" / "checkpoints" / "last.pt")]
    r = benchlib.timed(benchlib.mpirun(np_, benchlib.hpc("predict", *ck, "--input", str(test), "--out", str(out),
                                                          "--no-overlays")),
                       env_=benchlib.env(HPC_DFS_LOG_LEVEL="DEBUG"))
    m = re.search(r"written to .* in ([0-9.]+) s", r["stderr"])
    return {"np": np_, "cascade": cascade, "wall_s": r["wall_s"], "stage_s": float(m.group(1)) if m else None,
            "peak_rss_MB_max_process": r["peak_rss_MB_max_process"], "phases": phases(r["stderr"])}


def phases(stderr: str) -> dict:
    """Per rank (``rank0``, ...): its cases and phase times, from the stage's DEBUG ``phases`` lines."""
    out = {}
    for m in re.finditer(r"phases rank=(\d+) world=\d+ cases=(\S*) (\[.*\])", stderr):
        out[f"rank{m.group(1)}"] = {"cases": [c for c in m.group(2).split(",") if c],
                                    "phases": json.loads(m.group(3))}
    return dict(sorted(out.items()))


def summarise(runs: list[dict], slices: int, cases: int) -> dict:
    out = {}
    for cascade in (False, True):
        b = {n: min((r for r in runs if r["np"] == n and r["cascade"] == cascade), key=lambda r: r["wall_s"])
             for n in (1, 2)}
        key = "cascade" if cascade else "single_stage"
        out[key] = {f"np{n}": {"wall_s": b[n]["wall_s"], "slices_per_s_wall": round(slices / b[n]["wall_s"], 2),
                               "s_per_case_wall": round(b[n]["wall_s"] / cases, 3), "stage_s": b[n]["stage_s"],
                               "slices_per_s_stage": round(slices / b[n]["stage_s"], 2) if b[n]["stage_s"] else None}
                    for n in (1, 2)}
        out[key]["speedup_np2_wall"] = round(b[1]["wall_s"] / b[2]["wall_s"], 2)
        med = {n: statistics.median(r["wall_s"] for r in runs if r["np"] == n and r["cascade"] == cascade)
               for n in (1, 2)}
        out[key]["speedup_np2_wall_median"] = round(med[1] / med[2], 2)
        out[key]["speedup_np2_stage"] = (round(b[1]["stage_s"] / b[2]["stage_s"], 2)
                                         if b[1]["stage_s"] and b[2]["stage_s"] else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 held-out cases instead of 4")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS)
    a = ap.parse_args()
    n_test = 2 if a.quick else 4
    runs, identical = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-pred-") as tmp:
        tmp = Path(tmp)
        run, test = setup(tmp, 6, n_test, 160)
        slices = n_slices(test)
        for rep in range(a.repeats):
            for cascade in (False, True):
                ref = None
                for np_ in (1, 2):
                    out = tmp / f"pred{np_}{int(cascade)}"
                    runs.append(predict(np_, run, test, out, cascade))
                    print(json.dumps(runs[-1]), flush=True)
                    d = digests(out)
                    if ref is None:
                        ref = d
                    else:
                        key = "cascade" if cascade else "single_stage"
                        identical[key] = identical.get(key, True) and d == ref and bool(d)
    result = {"benchmark": "predict", "test_cases": n_test, "slices": slices, "runs": runs,
              **summarise(runs, slices, n_test), "byte_identical_np2_vs_np1": identical,
              "settings": "phantoms 144x144 in-plane, shards 96x96, refine windows 64x64, DFS fusion base width 8, "
                          "no TTA, post-processing on, 1 thread per rank",
              "goal": "np=2 >= 1.8x np=1 (whole command), outputs byte-identical",
              "note": "CPU shared with other jobs while measured (see machine.load_avg_at_end)", "quick": a.quick}
    print(benchlib.write_result("predict", result, a.out))


if __name__ == "__main__":
    main()
