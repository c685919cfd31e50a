"""Preprocessing wall time side by side with nnU-Net v2 (plan_and_preprocess -c 2d), np=1 and np=2, same cases.

    .venv/bin/python bench/bench_preprocess.py [--peer nnunet|none] [--quick] [--repeats 1] [--profile]

Cases: CT rendered around real KiTS19 labels at native size (``hpc-dfs synth --from-labels``, 6 cases of
512x512 and 59-85 slices; ``--quick``: 3). Every figure is a whole command's wall time (interpreter start,
imports, MPI/Horovod start-up, fingerprint and writing all counted), launched the way a user launches it:

- hpc-dfs: ``mpirun -np N python -m hpc_dfs preprocess`` (np=1 also through mpirun), at the default
  256x256 slices and at nnU-Net's 2d resolution (its plan's in-plane spacing and median slice shape);
- nnU-Net v2: ``nnUNetv2_plan_and_preprocess -d 1 -c 2d -np N -npfp N`` (its own process counts), from a
  venv that this script creates on demand (``bench/.venv-nnunet``, ``nnunetv2==2.8.1``), on a Dataset
  folder of symlinks to the same files, with nnUNet_raw/_preprocessed/_results in a temp folder.

Runs are interleaved (hpc-dfs and nnU-Net alternate) so that the ratios share the machine's load.
``--profile`` adds one np=2 run of hpc-dfs under cProfile per rank (top functions by cumulative time).
Every hpc-dfs run also carries ``phases``: per rank its cases, their voxels and the wall/CPU seconds of each
phase from the process's start (start-up + imports, parallel init, plan, fingerprint, exchange, write, manifest),
read from the stage's DEBUG line (``HPC_DFS_LOG_LEVEL=DEBUG``); ``ratios`` gives the medians over the
repeats beside the best runs. Writes ``bench/results/preprocess.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

NNUNET_VERSION = "2.8.1"
NNUNET_VENV = benchlib.REPO / "bench" / ".venv-nnunet"
NNUNET_CMD = NNUNET_VENV / "bin" / "nnUNetv2_plan_and_preprocess"


def ensure_nnunet() -> str:
    """``bench/.venv-nnunet`` through ``bench/nnunet_venv.sh`` (the one recipe: pinned nnunetv2 on .venv's CPU torch,
    where a bare ``pip install nnunetv2`` would pull a CUDA torch of several GB); its version."""
    subprocess.run(["bash", str(Path(__file__).resolve().parent / "nnunet_venv.sh")], check=True,
                   env=dict(os.environ, BASE_PY=sys.executable, NNUNET_VENV=str(NNUNET_VENV),
                            NNUNET_VERSION=NNUNET_VERSION))
    res = subprocess.run([str(NNUNET_VENV / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('nnunetv2'))"],
                         check=True, capture_output=True, text=True)
    return res.stdout.strip()


def nnunet_dataset(data: Path, raw: Path) -> Path:
    """nnU-Net's Dataset001 layout (imagesTr/case_X_0000.nii.gz, labelsTr, dataset.json) as symlinks."""
    ds = raw / "Dataset001_KiTSsynth"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(exist_ok=True)
    cases = sorted(p for p in data.glob("case_*") if (p / "segmentation.nii.gz").exists())
    for c in cases:
        (ds / "imagesTr" / f"{c.name}_0000.nii.gz").symlink_to((c / "imaging.nii.gz").resolve())
        (ds / "labelsTr" / f"{c.name}.nii.gz").symlink_to((c / "segmentation.nii.gz").resolve())
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "kidney": 1, "tumor": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return ds


def run_nnunet(np_: int, nn_root: Path) -> dict:
    """One whole ``nnUNetv2_plan_and_preprocess -c 2d`` into a fresh nnUNet_preprocessed; wall and peak RSS."""
    pre = nn_root / "preprocessed"
    shutil.rmtree(pre, ignore_errors=True)
    pre.mkdir()
    e = benchlib.env(nnUNet_raw=str(nn_root / "raw"), nnUNet_preprocessed=str(pre),
                     nnUNet_results=str(nn_root / "results"))
    r = benchlib.timed([str(NNUNET_CMD), "-d", "1", "-c", "2d", "-np", str(np_), "-npfp", str(np_)], env_=e)
    plans = json.loads((pre / "Dataset001_KiTSsynth" / "nnUNetPlans.json").read_text())["configurations"]["2d"]
    return {"tool": "nnunet", "np": np_, **_strip(r), "plan_2d": {
        "spacing": plans["spacing"], "patch_size": plans["patch_size"],
        "median_image_size_in_voxels": plans["median_image_size_in_voxels"]}}


def run_hpc(np_: int, data: Path, out: Path, slice_size: list[int], spacing: str | None,
            profile_dir: Path | None = None) -> dict:
    """One whole ``mpirun -np N hpc-dfs preprocess`` into a fresh folder; wall, stage and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["preprocess", "--data", str(data), "--out", str(out), "--no-progress",
            "--slice-size", ",".join(map(str, slice_size))]
    if spacing:
        args += ["--in-plane-spacing", spacing]
    if profile_dir is None:
        argv = benchlib.hpc(*args)
    else:  # one cProfile file per rank
        argv = ["sh", "-c", f'exec {sys.executable} -m cProfile -o {profile_dir}/rank$OMPI_COMM_WORLD_RANK.prof '
                            f'-m hpc_dfs {" ".join(args)}']
    r = benchlib.timed(benchlib.mpirun(np_, argv), env_=benchlib.env(HPC_DFS_LOG_LEVEL="DEBUG"))
    m = re.search(r"in ([0-9.]+) s on", r["stderr"])
    return {"tool": "hpc-dfs", "np": np_, "slice_size": slice_size, "in_plane_spacing": spacing or "auto",
            **_strip(r), "stage_s": float(m.group(1)) if m else None, "phases": phases(r["stderr"])}


def phases(stderr: str) -> dict:
    """Per rank (``rank0``, ...): its cases, their voxels and phase times, from the stage's DEBUG ``phases`` lines."""
    out = {}
    for m in re.finditer(r"phases rank=(\d+) world=\d+ fit_rank=(\d+) cases=(\S*) voxels=(\d+) (\[.*\])", stderr):
        out[f"rank{m.group(1)}"] = {"cases": [c for c in m.group(3).split(",") if c], "voxels": int(m.group(4)),
                                    "fits_clinical": m.group(2) == m.group(1), "phases": json.loads(m.group(5))}
    return dict(sorted(out.items()))


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("stdout", "stderr")}


def profile_summary(profile_dir: Path, top: int = 14) -> dict:
    """Per rank: total profiled seconds, import seconds, and the top hpc_dfs/library functions by cumtime."""
    out = {}
    for f in sorted(profile_dir.glob("rank*.prof")):
        st = pstats.Stats(str(f))
        rows = []
        imports = 0.0
        for (file, line, fn), (_cc, _nc, tt, ct, _callers) in st.stats.items():
            if fn == "_find_and_load" and "importlib" in file:
                imports = max(imports, ct)
            if "hpc_dfs" in file or fn in ("<built-in method nibabel>",):
                rows.append((ct, tt, f"{Path(file).parent.name}/{Path(file).name}:{line}({fn})"))
        rows.sort(reverse=True)
        out[f.stem] = {"total_s": round(st.total_tt, 2), "imports_s": round(imports, 2),
                       "top_cumulative": [{"fn": n, "cum_s": round(c, 2), "own_s": round(t, 2)}
                                          for c, t, n in rows[:top]]}
    return out


def best(runs: list[dict], **match) -> dict | None:
    sel = [r for r in runs if all(r.get(k) == v for k, v in match.items())]
    return min(sel, key=lambda r: r["wall_s"]) if sel else None


def median_wall(runs: list[dict], **match) -> float | None:
    """The median wall time of the matching runs (the repeats), or None."""
    import statistics

    sel = [r["wall_s"] for r in runs if all(r.get(k) == v for k, v in match.items())]
    return round(statistics.median(sel), 2) if sel else None


def ratios(runs: list[dict], nn_size: list[int], nn_spacing: str | None) -> dict:
    """The figures the goals are about: hpc-dfs/nnU-Net wall time at np=1 (<= 0.5) and np=2/np=1 (>= 1.8)."""
    def r(a, b, key="wall_s"):
        return round(a[key] / b[key], 3) if a and b and a.get(key) and b.get(key) else None
    h1, h2 = best(runs, tool="hpc-dfs", np=1, slice_size=[256, 256]), best(runs, tool="hpc-dfs", np=2,
                                                                              slice_size=[256, 256])
    n1, n2 = best(runs, tool="nnunet", np=1), best(runs, tool="nnunet", np=2)
    s1 = best(runs, tool="hpc-dfs", np=1, slice_size=nn_size, in_plane_spacing=nn_spacing) if nn_spacing else None
    s2 = best(runs, tool="hpc-dfs", np=2, slice_size=nn_size, in_plane_spacing=nn_spacing) if nn_spacing else None
    return {
        "hpc_np1_over_nnunet_np1_wall_256": r(h1, n1), "hpc_np1_over_nnunet_np1_wall_nnres": r(s1, n1),
        "hpc_np2_over_nnunet_np2_wall_256": r(h2, n2), "hpc_np2_over_nnunet_np2_wall_nnres": r(s2, n2),
        "hpc_speedup_np2_wall_256": r(h1, h2), "hpc_speedup_np2_wall_nnres": r(s1, s2),
        "hpc_speedup_np2_stage_256": r(h1, h2, "stage_s"), "nnunet_speedup_np2_wall": r(n1, n2),
        "hpc_speedup_np2_wall_256_median": _ratio(median_wall(runs, tool="hpc-dfs", np=1, slice_size=[256, 256]),
                                                  median_wall(runs, tool="hpc-dfs", np=2, slice_size=[256, 256])),
        "goals": "hpc np=1 wall <= 0.5x nnU-Net np=1 (both resolutions); hpc np=2 >= 1.8x its np=1, whole command",
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", choices=("nnunet", "none"), default="nnunet")
    ap.add_argument("--quick", action="store_true", help="3 cases, no nnU-Net resolution runs of hpc-dfs at np=2")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="add one np=2 hpc-dfs run under cProfile per rank")
    ap.add_argument("--data", type=Path, default=None, help="reuse these synthesised cases (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS)
    a = ap.parse_args()
    version = ensure_nnunet() if a.peer == "nnunet" else None
    cases = benchlib.CASES[:3] if a.quick else benchlib.CASES
    with tempfile.TemporaryDirectory(prefix="bench-pre-") as tmp:
        tmp = Path(tmp)
        data = benchlib.synth_cases(a.data or tmp / "data", cases)
        in_bytes = sum(p.stat().st_size for p in data.rglob("imaging.nii.gz"))
        runs: list[dict] = []

        def log(r):
            runs.append(r)
            print(json.dumps(r), flush=True)
        nn_size, nn_spacing = [256, 256], None
        if version:
            nn_root = tmp / "nnunet"
            nnunet_dataset(data, nn_root / "raw")
        for rep in range(a.repeats):
            if version:
                n1 = run_nnunet(1, nn_root)
                log(n1)
                nn_size = [int(v) for v in n1["plan_2d"]["median_image_size_in_voxels"][-2:]]
                nn_spacing = str(n1["plan_2d"]["spacing"][-1])
            log(run_hpc(1, data, tmp / "h", [256, 256], None))
            log(run_hpc(2, data, tmp / "h", [256, 256], None))
            if version:
                log(run_hpc(1, data, tmp / "h", nn_size, nn_spacing))
                if not a.quick:
                    log(run_hpc(2, data, tmp / "h", nn_size, nn_spacing))
                log(run_nnunet(2, nn_root))
        prof = None
        if a.profile:
            (tmp / "prof").mkdir()
            log({**run_hpc(2, data, tmp / "h", [256, 256], None, tmp / "prof"), "profiled": True})
            prof = profile_summary(tmp / "prof")
    result = {
        "benchmark": "preprocess", "cases": list(cases), "input_MB": round(in_bytes / 1e6, 2),
        "peer": f"nnunetv2=={version}" if version else None, "nnunet_resolution": {
            "slice_size": nn_size, "in_plane_spacing_mm": nn_spacing},
        "runs": [r for r in runs if not r.get("profiled")],
        "ratios": ratios([r for r in runs if not r.get("profiled")], nn_size, nn_spacing),
        "profile_np2": prof, "quick": a.quick,
        "note": "whole-command wall times; OMP_NUM_THREADS=1 for both tools; runs interleaved; CPU shared with "
                "other jobs while measured (see machine.load_avg_at_end)",
    }
    print(benchlib.write_result("preprocess", result, a.out))
    print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
