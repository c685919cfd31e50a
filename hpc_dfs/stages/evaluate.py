"""KiTS metrics of predicted label maps against ground truth: ``hpc-dfs evaluate``.

    hpc-dfs evaluate --pred runs/r1/pred --gt data/kits --out runs/r1/eval.json
    mpirun -np 8 hpc-dfs evaluate --pred runs/r1/pred --gt data/kits --out runs/r1/eval.json  # cases split over ranks

Predictions are matched to ground truth by KiTS naming: ``PRED/prediction_XXXXX.nii.gz`` is compared
with ``GT/case_XXXXX/segmentation.nii.gz`` (or KiTS21's ``aggregated_MAJ_seg.nii.gz``). Per case and
per region it computes:

- **KiTS19 official metrics**: kidney Dice on the composite ``label > 0`` (kidney + tumour [+ cyst]),
  tumour Dice on ``label == 2``; their mean is the KiTS19 score (``kits_score``).
- **IoU** (Jaccard) of both regions and their mean (``mean_iou``).
- **HD95** in mm with the voxel spacing of the ground-truth header, from
  :func:`monai.metrics.compute_hausdorff_distance` (MONAI's definition: the larger of the two directed
  95th-percentile surface distances).
- **Surface Dice** (normalised surface distance) at the KiTS21 tolerances, from
  :func:`monai.metrics.compute_surface_dice` with ``use_subvoxels=True`` (surfel areas, as DeepMind's
  ``surface-distance`` package that the KiTS21 evaluation uses). Tolerances: 2.178 mm for kidney+masses
  and 1.536 mm for tumour (neheller/kits21, ``kits21/configuration/labels.py``, ``HEC_NSD_TOLERANCES_MM``).

Empty masks (the KiTS convention, ``kits21/evaluation/metrics.py``):

==================  ======  =====  ============  ======
prediction / truth  Dice    IoU    surface Dice  HD95
==================  ======  =====  ============  ======
both empty          1       1      1             0
only one empty      0       0      0             null
==================  ======  =====  ============  ======

An undefined HD95 is written as ``null`` and left out of the mean; ``mean.n_hd95_undefined`` counts
them. Every other metric is defined for every case.

Outputs (all atomic): ``FILE.json`` (``{"cases": [...], "mean": {...}, ...}``), ``FILE.csv`` and
``FILE.md``. When raw (not post-processed) predictions are available (``--pred-raw``, or ``PRED/raw``
written by ``predict --save-raw``) the Dice of both is reported, so the effect of post-processing is
visible (``postprocessing`` in the JSON, a second table in the markdown).

Dice and IoU are counted with numpy (two sums; MONAI's versions need one-hot float tensors of the
whole volume and return NaN for empty-vs-empty, which KiTS defines as 1); the tests check them
against ``monai.metrics.DiceMetric`` and ``MeanIoU``.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hpc_dfs import config as cfgmod
from hpc_dfs import dist, fsutil
from hpc_dfs.config.predict import EvaluateConfig
from hpc_dfs.data.layout import PRED_RE
from hpc_dfs.log import get_logger

CLI_LONG_HELP = True  # `hpc-dfs evaluate --help` shows this module's whole docstring

log = get_logger("hpc_dfs.evaluate")

GT_NAMES = ("segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz", "segmentation.nii")
REGIONS = ("kidney", "tumor")
#: Columns of the CSV and the markdown table, in order (per-case keys of the JSON).
COLUMNS = ("kidney_dice", "tumor_dice", "kits_score", "kidney_iou", "tumor_iou", "mean_iou", "kidney_hd95",
           "tumor_hd95", "kidney_surface_dice", "tumor_surface_dice", "kidney_ml_gt", "kidney_ml_pred",
           "tumor_ml_gt", "tumor_ml_pred")


class EvaluationError(ValueError):
    """A prediction cannot be evaluated; the message names the files and the problem."""


# ----------------------------------------------------------------------------- regions
def region_masks(label: np.ndarray) -> dict[str, np.ndarray]:
    """KiTS19 evaluation regions of a label map: kidney = ``label > 0``, tumour = ``label == 2``."""
    return {"kidney": label > 0, "tumor": label == 2}


# ----------------------------------------------------------------------------- overlap metrics
def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two boolean masks; 1.0 when both are empty (KiTS convention)."""
    p, g = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if p + g == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & gt)) / (p + g)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


# ----------------------------------------------------------------------------- surface metrics
def _crop_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel (distances do not change)."""
    union = pred | gt
    box = []
    for ax in range(union.ndim):
        nz = np.flatnonzero(union.any(axis=tuple(i for i in range(union.ndim) if i != ax)))
        box.append(slice(max(int(nz[0]) - 1, 0), int(nz[-1]) + 2))
    return pred[tuple(box)], gt[tuple(box)]


def _as_batch(mask: np.ndarray):
    import torch
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)[None, None])


def hausdorff(pred: np.ndarray, gt: np.ndarray, spacing, percentile: float = 95.0) -> float | None:
    """Percentile Hausdorff distance in mm (MONAI); 0.0 when both are empty, None when only one is."""
    from monai.metrics import compute_hausdorff_distance
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 0.0
    if p_any != g_any:
        return None
    p, g = _crop_pair(pred, gt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(_as_batch(p), _as_batch(g), include_background=True, percentile=percentile,
                                        spacing=[float(s) for s in spacing])
    return float(hd.item())


def surface_dice(pred: np.ndarray, gt: np.ndarray, spacing, tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (MONAI, sub-voxel surfels); 1 both empty, 0 one empty."""
    from monai.metrics import compute_surface_dice
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 1.0
    if p_any != g_any:
        return 0.0
    p, g = _crop_pair(pred, gt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nsd = compute_surface_dice(_as_batch(p), _as_batch(g), [float(tolerance_mm)], include_background=True,
                                   spacing=[float(s) for s in spacing], use_subvoxels=True)
    return float(nsd.item())


# ----------------------------------------------------------------------------- one case
def evaluate_arrays(pred: np.ndarray, gt: np.ndarray, spacing, cfg: EvaluateConfig | None = None) -> dict[str, Any]:
    """All metrics of one predicted label map against its ground truth (same shape, spacing in mm per axis)."""
    cfg = cfg or EvaluateConfig()
    if pred.shape != gt.shape:
        raise EvaluationError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pm, gm = region_masks(pred), region_masks(gt)
    out: dict[str, Any] = {}
    for r in REGIONS:
        out[f"{r}_dice"] = dice(pm[r], gm[r])
    out["kits_score"] = (out["kidney_dice"] + out["tumor_dice"]) / 2.0
    for r in REGIONS:
        out[f"{r}_iou"] = iou(pm[r], gm[r])
    out["mean_iou"] = (out["kidney_iou"] + out["tumor_iou"]) / 2.0
    tol = {"kidney": cfg.kidney_tolerance_mm, "tumor": cfg.tumor_tolerance_mm}
    for r in REGIONS:
        if cfg.surface_metrics:
            out[f"{r}_hd95"] = hausdorff(pm[r], gm[r], spacing, cfg.hd_percentile)
            out[f"{r}_surface_dice"] = surface_dice(pm[r], gm[r], spacing, tol[r])
        else:
            out[f"{r}_hd95"] = None
            out[f"{r}_surface_dice"] = None
    for r in REGIONS:
        out[f"{r}_ml_gt"] = int(np.count_nonzero(gm[r])) * voxel_ml
        out[f"{r}_ml_pred"] = int(np.count_nonzero(pm[r])) * voxel_ml
    return out


def _load_label(path: Path):
    import nibabel as nib
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for a damaged file
        raise EvaluationError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    if data.ndim != 3:
        raise EvaluationError(f"{path}: expected a 3-D label map, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise EvaluationError(f"{path}: label map holds non-integer values")
    return data.astype(np.int16, copy=False), img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])


def evaluate_files(pred_path: Path, gt_path: Path, cfg: EvaluateConfig | None = None) -> dict[str, Any]:
    """Metrics of one prediction file against one ground-truth file (spacing from the ground truth)."""
    pred, p_aff, _ = _load_label(pred_path)
    gt, g_aff, spacing = _load_label(gt_path)
    if pred.shape != gt.shape:
        raise EvaluationError(f"{pred_path.name} has shape {pred.shape} but {gt_path} has shape {gt.shape}; a "
                              f"prediction must be on the ground truth's grid")
    if not np.allclose(p_aff, g_aff, atol=1e-3):
        log.warning("%s: affine differs from %s (evaluating on the voxel grid anyway)", pred_path.name, gt_path)
    return evaluate_arrays(pred, gt, spacing, cfg)


# ----------------------------------------------------------------------------- matching
def case_id_of(pred_name: str) -> str | None:
    """``prediction_00012.nii.gz`` -> ``case_00012`` (None for names that do not follow KiTS naming)."""
    m = PRED_RE.match(pred_name)
    return f"case_{m.group(1)}" if m else None


def find_ground_truth(gt_dir: Path, case_id: str) -> Path | None:
    for name in GT_NAMES:
        p = gt_dir / case_id / name
        if p.exists():
            return p
    return None


def match_predictions(pred_dir: Path, gt_dir: Path) -> tuple[list[tuple[str, Path, Path | None]], list[str]]:
    """Pair ``prediction_XXXXX`` files with ``case_XXXXX`` ground truth.

    Returns:
        ``[(case_id, pred_path, gt_path or None)]`` sorted by case id, and the ground-truth case ids
        that have no prediction.
    """
    if not pred_dir.is_dir():
        raise EvaluationError(f"prediction directory {pred_dir} does not exist")
    if not gt_dir.is_dir():
        raise EvaluationError(f"ground-truth directory {gt_dir} does not exist")
    pairs = []
    for p in sorted(pred_dir.iterdir()):
        cid = case_id_of(p.name)
        if cid is not None and p.is_file():
            pairs.append((cid, p, find_ground_truth(gt_dir, cid)))
    if not pairs:
        raise EvaluationError(f"{pred_dir} holds no prediction_XXXXX.nii.gz files")
    predicted = {c for c, _, _ in pairs}
    gt_cases = sorted(d.name for d in gt_dir.glob("case_*") if d.is_dir() and find_ground_truth(gt_dir, d.name))
    return pairs, [c for c in gt_cases if c not in predicted]


# ----------------------------------------------------------------------------- aggregation and writing
def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def summarise(cases: list[dict]) -> dict[str, Any]:
    """Mean of every metric over cases (None values left out), with counts."""
    mean: dict[str, Any] = {"n_cases": len(cases)}
    for k in COLUMNS:
        mean[k] = _mean(c.get(k) for c in cases)
    for r in REGIONS:
        mean[f"n_{r}_hd95_undefined"] = sum(1 for c in cases if c.get(f"{r}_hd95") is None)
    mean["n_hd95_undefined"] = mean["n_kidney_hd95_undefined"] + mean["n_tumor_hd95_undefined"]
    return mean


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    extra = [k for k in ("kidney_dice_raw", "tumor_dice_raw", "kits_score_raw") if any(k in c for c in result["cases"])]
    w.writerow(["case_id", *COLUMNS, *extra])
    for c in result["cases"]:
        w.writerow([c["case_id"], *("" if c.get(k) is None else repr(float(c[k])) for k in (*COLUMNS, *extra))])
    m = result["mean"]
    w.writerow(["mean", *("" if m.get(k) is None else repr(float(m[k])) for k in (*COLUMNS, *extra))])
    return buf.getvalue()


MD_HEAD = ("case", "kidney Dice", "tumour Dice", "KiTS19 score", "mean IoU", "kidney HD95 (mm)", "tumour HD95 (mm)",
           "kidney SD", "tumour SD")
MD_KEYS = ("kidney_dice", "tumor_dice", "kits_score", "mean_iou", "kidney_hd95", "tumor_hd95", "kidney_surface_dice",
           "tumor_surface_dice")


def to_markdown(result: dict) -> str:
    lines = ["# Evaluation", "",
             f"Predictions `{result['pred_dir']}` against ground truth `{result['gt_dir']}`: "
             f"{result['mean']['n_cases']} cases.", "",
             "| " + " | ".join(MD_HEAD) + " |", "|" + "---|" * len(MD_HEAD)]
    for c in result["cases"]:
        lines.append("| " + " | ".join([c["case_id"], *(_fmt(c.get(k)) for k in MD_KEYS)]) + " |")
    m = result["mean"]
    lines.append("| **mean** | " + " | ".join(f"**{_fmt(m.get(k))}**" for k in MD_KEYS) + " |")
    pp = result.get("postprocessing")
    if pp:
        lines += ["", "## Effect of post-processing (mean Dice)", "", "| | kidney Dice | tumour Dice | KiTS19 score |",
                  "|---|---|---|---|"]
        for name in ("raw", "postprocessed", "delta"):
            lines.append(f"| {name} | " + " | ".join(_fmt(pp[name][k]) for k in ("kidney_dice", "tumor_dice",
                                                                                  "kits_score")) + " |")
    if result.get("errors"):
        lines += ["", "## Cases that could not be evaluated", ""] + [f"- {e['case_id']}: {e['error']}"
                                                                      for e in result["errors"]]
    if result.get("missing_predictions"):
        lines += ["", f"Ground-truth cases without a prediction: {', '.join(result['missing_predictions'])}"]
    t = result["tolerances_mm"]
    lines += ["", f"Kidney = label > 0 (composite), tumour = label == 2. SD = surface Dice at the KiTS21 tolerances "
                  f"({t['kidney']:.3f} mm kidney, {t['tumor']:.3f} mm tumour). "
                  f"Both empty: Dice = IoU = SD = 1, HD95 = 0; "
                  f"one empty: Dice = IoU = SD = 0, HD95 undefined (-, left out of the mean).", ""]
    return "\n".join(lines)


def evaluate_dirs(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every prediction in ``cfg.pred``; returns the result dict (not written)."""
    pred_dir, gt_dir = Path(cfg.pred), Path(cfg.gt)
    pairs, missing = match_predictions(pred_dir, gt_dir)
    raw_dir = Path(cfg.pred_raw) if cfg.pred_raw else (pred_dir / "raw" if (pred_dir / "raw").is_dir() else None)
    if cfg.pred_raw and not raw_dir.is_dir():
        raise EvaluationError(f"--pred-raw directory {raw_dir} does not exist")
    rank, world = dist.rank(), dist.size()
    mine = pairs
    if world > 1:  # each rank evaluates a share, balanced by file size; results are gathered in case order
        from hpc_dfs.data.reader import partition_balanced
        mine = partition_balanced([(p, p[1].stat().st_size) for p in pairs], rank, world)
    cases, errors = [], []
    for cid, pred_path, gt_path in mine:
        try:
            if gt_path is None:
                raise EvaluationError(f"{pred_path.name} has no ground truth: none of {', '.join(GT_NAMES)} in "
                                      f"{gt_dir / cid}")
            row = {"case_id": cid, **evaluate_files(pred_path, gt_path, cfg)}
            if raw_dir is not None:
                raw_path = raw_dir / pred_path.name
                if not raw_path.exists():
                    raise EvaluationError(f"raw prediction {raw_path} is missing (post-processed one exists)")
                raw_pred, _, _ = _load_label(raw_path)
                gt, _, spacing = _load_label(gt_path)
                if raw_pred.shape != gt.shape:
                    raise EvaluationError(f"{raw_path} has shape {raw_pred.shape} but {gt_path} has {gt.shape}")
                gm, rm = region_masks(gt), region_masks(raw_pred)
                row["kidney_dice_raw"] = dice(rm["kidney"], gm["kidney"])
                row["tumor_dice_raw"] = dice(rm["tumor"], gm["tumor"])
                row["kits_score_raw"] = (row["kidney_dice_raw"] + row["tumor_dice_raw"]) / 2
            cases.append(row)
            log.info("%s: kidney Dice %.4f, tumour Dice %.4f", cid, row["kidney_dice"], row["tumor_dice"])
        except EvaluationError as e:
            log.error("%s: %s", cid, e)
            errors.append({"case_id": cid, "error": str(e)})
    if world > 1:
        parts = dist.allgather_object((cases, errors))
        cases = sorted((c for part in parts for c in part[0]), key=lambda c: c["case_id"])
        errors = sorted((e for part in parts for e in part[1]), key=lambda e: e["case_id"])
    if rank == 0:
        for c in missing:
            log.warning("%s has ground truth but no prediction in %s", c, pred_dir)
    result: dict[str, Any] = {
        "pred_dir": str(pred_dir), "gt_dir": str(gt_dir),
        "definitions": {"kidney": "label > 0", "tumor": "label == 2", "kits_score": "(kidney_dice + tumor_dice) / 2",
                        "mean_iou": "(kidney_iou + tumor_iou) / 2",
                        "hd95": f"MONAI compute_hausdorff_distance, percentile {cfg.hd_percentile}, mm",
                        "surface_dice": "MONAI compute_surface_dice(use_subvoxels=True), KiTS21 tolerances",
                        "empty": "both empty: dice=iou=surface_dice=1, hd95=0; one empty: dice=iou=surface_dice=0, "
                                 "hd95=null (left out of means)"},
        "tolerances_mm": {"kidney": cfg.kidney_tolerance_mm, "tumor": cfg.tumor_tolerance_mm},
        "cases": cases, "mean": summarise(cases), "errors": errors, "missing_predictions": missing,
    }
    if raw_dir is not None and cases:
        raw = {k: _mean(c[f"{k}_raw"] for c in cases) for k in ("kidney_dice", "tumor_dice", "kits_score")}
        post = {k: result["mean"][k] for k in ("kidney_dice", "tumor_dice", "kits_score")}
        for k, v in raw.items():
            result["mean"][f"{k}_raw"] = v
        result["postprocessing"] = {"raw_dir": str(raw_dir), "raw": raw, "postprocessed": post,
                                    "delta": {k: post[k] - raw[k] for k in raw}}
    return result


def write_outputs(result: dict, out: Path) -> list[Path]:
    """Write ``out`` (JSON) and the CSV and markdown beside it, atomically."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".json" else out
    paths = [stem.with_suffix(".json"), stem.with_suffix(".csv"), stem.with_suffix(".md")]
    fsutil.write_json(paths[0], result)
    fsutil.write_text(paths[1], to_csv(result))
    fsutil.write_text(paths[2], to_markdown(result))
    return paths


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    cfgmod.add_arguments(parser, EvaluateConfig)


def main(args: argparse.Namespace) -> int:
    dist.init(horovod=False)  # ranks + object collectives only (mpi4py under MPI launchers)
    try:
        cfg = cfgmod.from_args(EvaluateConfig, args)
        for name in ("pred", "gt", "out"):
            if not getattr(cfg, name):
                raise cfgmod.ConfigError(f"--{name} is required")
        result = evaluate_dirs(cfg)
    except (cfgmod.ConfigError, EvaluationError) as e:
        log.error("%s", e)
        return 2
    if dist.rank() != 0:
        return 1 if result["errors"] else 0
    paths = write_outputs(result, Path(cfg.out))
    m = result["mean"]
    if result["cases"]:
        log.info("%d cases: kidney Dice %.4f, tumour Dice %.4f, KiTS19 score %.4f -> %s", m["n_cases"],
                 m["kidney_dice"], m["tumor_dice"], m["kits_score"], ", ".join(map(str, paths)))
    if result["errors"]:
        log.error("%d of %d predictions could not be evaluated (listed in %s)", len(result["errors"]),
                  len(result["errors"]) + len(result["cases"]), paths[0])
        return 1
    return 0
