"""Every metric of one case (arrays or files), a missing prediction scored as background, and the means."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from hpc_dfs.config.predict import EvaluateConfig
from hpc_dfs.contracts.evaluation import COLUMNS, DETECTION_COLUMNS
from hpc_dfs.contracts.kits import IMAGE_NAME
from hpc_dfs.errors import EXIT_USAGE, HpcDfsError
from hpc_dfs.log import get_logger
from hpc_dfs.metrics.detection import kits_affine, tumour_detection
from hpc_dfs.metrics.overlap import REGIONS, dice, iou, region_masks
from hpc_dfs.metrics.surface import hausdorff, surface_dice

__all__ = ["EvaluationError", "PRED_LABELS", "GT_LABELS", "evaluate_arrays", "check_labels", "evaluate_files",
           "evaluate_missing", "raw_dice", "mean_of", "summarise", "summarise_all", "load_label"]

log = get_logger("hpc_dfs.evaluate")


class EvaluationError(HpcDfsError, ValueError):
    """A prediction cannot be evaluated; the message names the files and the problem."""

    code = EXIT_USAGE


PRED_LABELS = (0, 1, 2)


GT_LABELS = (0, 1, 2, 3)


def _surface_metrics(pm: dict, gm: dict, spacing, cfg: EvaluateConfig) -> dict[str, Any]:
    tol = {"kidney": cfg.kidney_tolerance_mm, "tumor": cfg.tumor_tolerance_mm}
    out: dict[str, Any] = {}
    for r in REGIONS:
        if cfg.surface_metrics:
            out[f"{r}_hd95"] = hausdorff(pm[r], gm[r], spacing, cfg.hd_percentile)
            out[f"{r}_surface_dice"] = surface_dice(pm[r], gm[r], spacing, tol[r])
        else:
            out[f"{r}_hd95"] = None
            out[f"{r}_surface_dice"] = None
    return out


def evaluate_arrays(pred: np.ndarray, gt: np.ndarray, spacing, cfg: EvaluateConfig | None = None,
                    affine: np.ndarray | None = None, image: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of one predicted label map against its ground truth.

    Args:
        pred: predicted label map.
        gt: ground-truth label map, same shape.
        spacing: voxel spacing in mm per array axis.
        cfg: metric settings (tolerances, HD percentile); defaults to :class:`EvaluateConfig`.
        affine: the ground truth's affine, for the body sides of the detection columns (default
            :func:`kits_affine`).
        image: the case's CT on the same grid, if at hand: each tumour then carries its contrast.

    Raises:
        EvaluationError: the shapes differ.
    """
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
    out.update(_surface_metrics(pm, gm, spacing, cfg))
    for r in REGIONS:
        out[f"{r}_ml_gt"] = int(np.count_nonzero(gm[r])) * voxel_ml
        out[f"{r}_ml_pred"] = int(np.count_nonzero(pm[r])) * voxel_ml
    out.update(tumour_detection(pred, gt, kits_affine(spacing) if affine is None else affine, voxel_ml, image))
    out["spacing_mm"] = [float(v) for v in spacing]
    return out


def check_labels(data: np.ndarray, allowed: tuple[int, ...], path: Path) -> None:
    """Raise :class:`EvaluationError` naming ``path`` when ``data`` holds a value outside ``allowed``."""
    bad = sorted(set(np.unique(data).tolist()) - set(allowed))
    if bad:
        raise EvaluationError(f"{path}: label value(s) {', '.join(map(str, bad[:5]))} outside "
                              f"{{{', '.join(map(str, allowed))}}}")


def load_label(path: Path, error: type[HpcDfsError] = EvaluationError):
    """A 3-D label map as int16, its affine and its header's voxel spacing (mm).

    Args:
        path: the NIfTI file.
        error: the error class to raise (each evaluation names its own).

    Raises:
        HpcDfsError: (``error``) the file cannot be read, is not 3-D, or holds non-integer values; names the file.
    """
    import nibabel as nib

    from hpc_dfs.data.checks import GeometryProblem, checked_spacing
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for a damaged file
        raise error(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    if data.ndim != 3:
        raise error(f"{path}: expected a 3-D label map, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise error(f"{path}: label map holds non-integer values")
    try:  # the spacing every stage uses (hpc_dfs.data.checks): pixdim, once it agrees with the affine
        spacing = checked_spacing(data.shape, img.affine, img.header.get_zooms()[:3])
    except GeometryProblem as e:
        raise error(f"{path}: {e}") from None
    return data.astype(np.int16, copy=False), img.affine, spacing


def evaluate_files(pred_path: Path, gt_path: Path, cfg: EvaluateConfig | None = None) -> dict[str, Any]:
    """Metrics of one prediction file against one ground-truth file (spacing and affine of the ground truth).

    Raises:
        EvaluationError: a file cannot be read, holds labels outside its set, or the grids differ.
    """
    pred, p_aff, _ = load_label(pred_path)
    gt, g_aff, spacing = load_label(gt_path)
    check_labels(pred, PRED_LABELS, pred_path)
    check_labels(gt, GT_LABELS, gt_path)
    if pred.shape != gt.shape:
        raise EvaluationError(f"{pred_path.name} has shape {pred.shape} but {gt_path} has shape {gt.shape}; a "
                              f"prediction must be on the ground truth's grid")
    if not np.allclose(p_aff, g_aff, atol=1e-3):
        log.warning("%s: affine differs from %s (evaluating on the voxel grid anyway)", pred_path.name, gt_path)
    return evaluate_arrays(pred, gt, spacing, cfg, affine=g_aff, image=_case_image(gt_path, gt.shape))


def _case_image(gt_path: Path, shape: tuple) -> np.ndarray | None:
    """The CT beside a ground truth (KiTS layout), for the tumours' contrast; None when absent or on another grid."""
    import nibabel as nib
    path = gt_path.parent / IMAGE_NAME
    if not path.is_file():
        return None
    try:
        img = nib.load(str(path))
        if tuple(img.shape) != tuple(shape):
            return None
        return np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # the contrast is a description, never a reason to fail the evaluation
        log.warning("%s: cannot read the CT for the tumours' contrast (%s: %s)", path, type(e).__name__, e)
        return None


def evaluate_missing(gt_path: Path, cfg: EvaluateConfig | None = None) -> dict[str, Any]:
    """A ground-truth case without a prediction, scored as an all-background prediction (KiTS)."""
    gt, g_aff, spacing = load_label(gt_path)
    check_labels(gt, GT_LABELS, gt_path)
    row = evaluate_arrays(np.zeros_like(gt), gt, spacing, cfg, affine=g_aff)
    row["status"] = "missing prediction"
    return row


def raw_dice(raw_dir: Path, pred_path: Path, gt_path: Path) -> dict[str, float]:
    """Dice of the prediction before post-processing (``raw_dir``), to report what post-processing changed.

    Args:
        raw_dir: the predictions before post-processing (``PRED/raw``).
        pred_path: the post-processed prediction (its name is looked up in ``raw_dir``).
        gt_path: the ground truth.

    Raises:
        EvaluationError: the raw prediction is missing, unreadable, off its label set or on another grid.
    """
    raw_path = raw_dir / pred_path.name
    if not raw_path.exists():
        raise EvaluationError(f"raw prediction {raw_path} is missing (post-processed one exists)")
    raw_pred, _, _ = load_label(raw_path)
    check_labels(raw_pred, PRED_LABELS, raw_path)
    gt, _, _ = load_label(gt_path)
    if raw_pred.shape != gt.shape:
        raise EvaluationError(f"{raw_path} has shape {raw_pred.shape} but {gt_path} has {gt.shape}")
    gm, rm = region_masks(gt), region_masks(raw_pred)
    row = {"kidney_dice_raw": dice(rm["kidney"], gm["kidney"]), "tumor_dice_raw": dice(rm["tumor"], gm["tumor"])}
    row["kits_score_raw"] = (row["kidney_dice_raw"] + row["tumor_dice_raw"]) / 2
    return row


def mean_of(values) -> float | None:
    """The mean of the values that are neither None nor NaN; None when there is none.

    Args:
        values: numbers, None or NaN.
    """
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def summarise(cases: list[dict]) -> dict[str, Any]:
    """Mean of every metric over cases (None values left out), with counts and detection totals."""
    mean: dict[str, Any] = {"n_cases": len(cases)}
    for k in COLUMNS:
        mean[k] = mean_of(c.get(k) for c in cases)
    for r in REGIONS:
        mean[f"n_{r}_hd95_undefined"] = sum(1 for c in cases if c.get(f"{r}_hd95") is None)
    mean["n_hd95_undefined"] = mean["n_kidney_hd95_undefined"] + mean["n_tumor_hd95_undefined"]
    for k in DETECTION_COLUMNS:  # totals over cases, not means
        mean[k] = sum(c.get(k) or 0 for c in cases)
    return mean


def summarise_all(cases: list[dict], missing_rows: list[dict]) -> dict[str, Any]:
    """Means over every ground-truth case, missing predictions scored as all background (KiTS)."""
    out = summarise(cases + missing_rows)
    out["n_missing"] = len(missing_rows)
    out["rule"] = ("a missing prediction is scored as an all-background prediction: Dice 0 where the ground truth "
                   "has the region, every tumour missed")
    return out
