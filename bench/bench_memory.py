"""Peak RSS per rank of ``hpc-dfs preprocess`` on the largest KiTS19 case shapes; goal <= 3x the case's int16 volume.

    .venv/bin/python bench/bench_memory.py [--quick] [--out bench/results]

Writes two synthetic KiTS-layout cases with nibabel (an int16 body phantom with two kidneys and a tumour):
512x512 x 1,000 slices (the longest KiTS19 cases have 1,059) and 252 x 512x796 (the widest, case_00160's
shape; not among the labels in shared/). ``--quick``: 300 and 100 slices. Each case is preprocessed alone at
np=1, then both together at np=2 (one case per rank), every run through ``mpirun``; a psutil poll (every
50 ms) of the job's process tree gives the peak RSS of the largest process (= the rank holding the case).
The floor is the RSS of a rank that has only imported the stage (python + numpy + torch + h5py). Each run
states two ratios: ``peak_over_int16`` (peak RSS / int16 volume: the goal's figure) and
``above_floor_over_int16`` ((peak RSS - floor) / int16 volume: what the case itself costs; the floor, about
250 MB, is paid by any process that imports torch and weighs most on the smaller case).
Writes ``bench/results/memory.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

SHAPES = {"case_00000": ((1000, 512, 512), (1.0, 0.78, 0.78)), "case_00001": ((252, 512, 796), (3.0, 0.8, 0.8))}
QUICK = {"case_00000": ((300, 512, 512), (1.0, 0.78, 0.78)), "case_00001": ((100, 512, 796), (3.0, 0.8, 0.8))}


def write_case(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> int:
    """An int16 CT phantom + uint8 labels in KiTS layout; returns the int16 volume's bytes."""
    import nibabel as nib

    sys.path.insert(0, str(benchlib.REPO))
    from hpc_dfs.data.kits_io import kits_affine

    nz, ny, nx = shape
    y, x = np.ogrid[:ny, :nx]
    body = ((y - ny / 2) / (0.42 * ny)) ** 2 + ((x - nx / 2) / (0.45 * nx)) ** 2 <= 1
    kid = [((y - ny * 0.55) / (0.06 * ny)) ** 2 + ((x - nx * c) / (0.05 * nx)) ** 2 <= 1 for c in (0.32, 0.68)]
    ct = np.full(shape, -1000, np.int16)
    lab = np.zeros(shape, np.uint8)
    z0, z1 = int(nz * 0.4), int(nz * 0.6)
    rng = np.random.default_rng(0)
    for z in range(nz):
        sl = np.where(body, 40, -1000).astype(np.int16)
        sl += rng.integers(-20, 20, size=sl.shape, dtype=np.int16)
        if z0 <= z < z1:
            for k in kid:
                sl[k] = 180
                lab[z][k] = 1
            lab[z][(y - ny * 0.55) ** 2 + (x - nx * 0.32) ** 2 <= (0.02 * ny) ** 2] = 2
        ct[z] = sl
    folder.mkdir(parents=True)
    aff = kits_affine(spacing)
    nib.save(nib.Nifti1Image(ct, aff), folder / "imaging.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), folder / "segmentation.nii.gz")
    return ct.nbytes


def floor_rss() -> float:
    """Peak RSS (MB) of a process that imports what a preprocessing rank imports, and nothing else."""
    r = benchlib.timed([sys.executable, "-c", "import h5py, hpc_dfs.stages.preprocess, hpc_dfs.parallel, time; "
                                              "time.sleep(0.5)"])
    return r["peak_rss_MB_max_process"]


def ratios(peak_mb: float, floor_mb: float, int16_bytes: int) -> dict:
    """The plain ratio (peak / int16 volume) and the one above the import floor ((peak - floor) / int16 volume)."""
    return {"peak_over_int16": round(peak_mb * 1e6 / int16_bytes, 2),
            "above_floor_over_int16": round((peak_mb - floor_mb) * 1e6 / int16_bytes, 2)}


def run(np_: int, data: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = benchlib.timed(benchlib.mpirun(np_, benchlib.hpc("preprocess", "--data", str(data), "--out", str(out),
                                                          "--no-progress", "--clinical", "none")), poll_s=0.05)
    return {k: v for k, v in r.items() if k not in ("stdout", "stderr")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 and 100 slices instead of 1,000 and 252")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS)
    a = ap.parse_args()
    shapes = QUICK if a.quick else SHAPES
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        tmp = Path(tmp)
        both = tmp / "both"
        sizes = {c: write_case(both / c, shape, sp) for c, (shape, sp) in shapes.items()}
        floor = floor_rss()
        for case, (shape, _sp) in shapes.items():
            one = tmp / f"one_{case}"
            one.mkdir()
            (one / case).symlink_to(both / case)
            r = run(1, one, tmp / "o")
            rows.append({"np": 1, "case": case, "shape_zyx": shape, "int16_MB": round(sizes[case] / 1e6, 1), **r,
                         **ratios(r["peak_rss_MB_max_process"], floor, sizes[case])})
            print(json.dumps(rows[-1]), flush=True)
        r = run(2, both, tmp / "o")
        big = max(sizes.values())
        rows.append({"np": 2, "case": "both (one per rank)", "int16_MB": round(big / 1e6, 1), **r,
                     **ratios(r["peak_rss_MB_max_process"], floor, big)})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "memory", "runs": rows, "import_floor_rss_MB": floor, "quick": a.quick,
        "worst_peak_over_int16": max(r["peak_over_int16"] for r in rows),
        "worst_above_floor_over_int16": max(r["above_floor_over_int16"] for r in rows),
        "goal": "peak RSS of a rank <= 3x the int16 volume of its case",
        "ratios": "peak_over_int16 = peak RSS / int16 volume; above_floor_over_int16 = (peak RSS - import floor) / "
                  "int16 volume",
        "note": "peak RSS polled every 50 ms (psutil) over the mpirun process tree; the largest process is the rank "
                "holding the biggest case; CPU shared with other jobs while measured",
    }
    print(benchlib.write_result("memory", result, a.out))


if __name__ == "__main__":
    main()
