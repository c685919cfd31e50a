"""KiTS metrics of predicted label maps against ground truth: ``hpc-dfs evaluate``.

    hpc-dfs evaluate --pred runs/r1/pred --gt data/kits --out runs/r1/eval.json
    hpc-dfs evaluate --pred runs/r1/pred --gt data/kits --out runs/r1/eval.json --strict   # missing = error
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

**Tumour detection** (per case, :func:`tumour_detection`). Components are 6-connected (face
neighbours, as in :mod:`hpc_dfs.postprocess`). Every ground-truth tumour component (``label == 2``)
is put on the patient's left or right by the world x (RAS, from the ground truth's affine) of its
centroid against a midline: the midpoint between the x centroids of the two largest ground-truth
kidney components (``label > 0``), or the centre of the grid when the ground truth has fewer than two.
Each ground-truth tumour component is then

- **hit**: at least one voxel of it is predicted tumour;
- **wrong kidney**: not hit, and the largest false-positive tumour component lies on the other side of
  the midline (the model found "the" tumour, in the other kidney);
- **missed**: otherwise.

A **false-positive component** is a predicted tumour component that touches no ground-truth tumour
voxel. Columns: ``tumor_ml_gt``, ``tumor_ml_pred``, ``n_tumors_gt``, ``n_tumors_hit``,
``n_tumors_missed``, ``n_tumors_wrong_kidney``, ``n_fp_components``, ``fp_ml`` and a one-word
``detection`` (``hit``, ``missed``, ``wrong kidney``, ``partial``, ``no tumour``); the JSON also lists
every component (``tumors``: volume, side, status).

**Missing predictions** (a ground-truth case without ``prediction_XXXXX``) are scored as an
all-background prediction, as KiTS does: Dice 0 for a region the ground truth has (1 when it has
none), every tumour missed. Their rows are ``missing_cases`` in the JSON and marked in the tables;
``mean`` is over the evaluated predictions (``mean.n_cases``), and ``mean_all`` over every
ground-truth case, missing ones counted (``mean_all.n_cases``, ``mean_all.n_missing``). ``--strict``
makes a missing prediction an error (exit code 3) instead.

**Provenance.** When ``PRED/summary.json`` (written by ``hpc-dfs predict``) records each case's provenance,
every prediction must be an ``ok`` case of that run, with the ``descrip`` of its NIfTI header equal to the
summary's (the checkpoint and input sha256): a stale file of another run is an error naming it (exit code 3).

**Labels.** A prediction may hold only 0 (background), 1 (kidney) and 2 (tumour); any other value is
an error naming the case (ground truth may also hold KiTS21's 3, cyst, counted as kidney).

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
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hpc_dfs import config as cfgmod
from hpc_dfs import parallel, fsutil
from hpc_dfs.config.predict import EvaluateConfig
from hpc_dfs.data.layout import PRED_RE
from hpc_dfs.errors import EXIT_DATA, EXIT_USAGE, HpcDfsError
from hpc_dfs.log import get_logger

CLI_LONG_HELP = True  # `hpc-dfs evaluate --help` shows this module's whole docstring

log = get_logger("hpc_dfs.evaluate")

GT_NAMES = ("segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz", "segmentation.nii")
REGIONS = ("kidney", "tumor")
#: Columns of the CSV and the markdown table, in order (per-case keys of the JSON).
COLUMNS = ("kidney_dice", "tumor_dice", "kits_score", "kidney_iou", "tumor_iou", "mean_iou", "kidney_hd95",
           "tumor_hd95", "kidney_surface_dice", "tumor_surface_dice", "kidney_ml_gt", "kidney_ml_pred",
           "tumor_ml_gt", "tumor_ml_pred")
#: Detection columns (integers and volumes, see the module docstring), after ``COLUMNS`` in the CSV.
DETECTION_COLUMNS = ("n_tumors_gt", "n_tumors_hit", "n_tumors_missed", "n_tumors_wrong_kidney", "n_fp_components",
                     "fp_ml")
PRED_LABELS = (0, 1, 2)
GT_LABELS = (0, 1, 2, 3)


class EvaluationError(HpcDfsError, ValueError):
    """A prediction cannot be evaluated; the message names the files and the problem."""

    code = EXIT_USAGE


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


# ----------------------------------------------------------------------------- tumour detection
def kits_affine(spacing) -> np.ndarray:
    """The affine of a KiTS19 array (axes I, P, L; spacing per array axis) used when none is given."""
    s = [float(v) for v in spacing]
    return np.array([[0, 0, -s[2], 0], [0, -s[1], 0, 0], [-s[0], 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage
    return ndimage.label(mask)  # 6-connectivity (face neighbours), as hpc_dfs.postprocess


def _centroid_x(lab: np.ndarray, n: int, affine: np.ndarray) -> np.ndarray:
    """World x (RAS mm) of the centroid of components 1..n of ``lab``."""
    from scipy import ndimage
    if n == 0:
        return np.zeros(0)
    cents = np.asarray(ndimage.center_of_mass(np.ones(lab.shape), lab, range(1, n + 1)), dtype=np.float64)
    return (np.c_[cents, np.ones(n)] @ np.asarray(affine, dtype=np.float64).T)[:, 0]


def kidney_midline_x(gt: np.ndarray, affine: np.ndarray) -> float:
    """Midline (world x, mm) between the two largest ground-truth kidney components, else the grid centre."""
    lab, n = _components(gt > 0)
    if n >= 2:
        sizes = np.bincount(lab.ravel())[1:]
        two = np.argsort(-sizes, kind="stable")[:2]
        xs = _centroid_x(lab, n, affine)[two]
        return float(xs.mean())
    centre = (np.asarray(gt.shape, dtype=np.float64) - 1) / 2.0
    return float((np.asarray(affine, dtype=np.float64) @ np.append(centre, 1.0))[0])


def _side(x: float, mid: float) -> str:
    return "right" if x > mid else "left"  # RAS: world x grows towards the patient's right


def tumour_detection(pred: np.ndarray, gt: np.ndarray, affine: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    """Per ground-truth tumour component: hit, missed or wrong kidney; and the false-positive components.

    Args:
        pred: predicted label map.
        gt: ground-truth label map on the same grid.
        affine: the ground truth's voxel-to-world (RAS mm) affine (sides of the body).
        voxel_ml: volume of one voxel in ml.

    Returns:
        the ``DETECTION_COLUMNS``, ``detection`` (one word) and ``tumors`` (one dict per component).
    """
    mid = kidney_midline_x(gt, affine)
    g_lab, n_g = _components(gt == 2)
    p_lab, n_p = _components(pred == 2)
    p_sizes = np.bincount(p_lab.ravel(), minlength=n_p + 1)
    touching = set(np.unique(p_lab[(gt == 2) & (p_lab > 0)]).tolist())
    fp = [i for i in range(1, n_p + 1) if i not in touching]
    p_x = _centroid_x(p_lab, n_p, affine)
    largest_fp_side = _side(p_x[max(fp, key=lambda i: (p_sizes[i], -i)) - 1], mid) if fp else None
    g_x = _centroid_x(g_lab, n_g, affine)
    g_sizes = np.bincount(g_lab.ravel(), minlength=n_g + 1)
    tumors = []
    for i in range(1, n_g + 1):
        side = _side(g_x[i - 1], mid)
        if np.any(pred[g_lab == i] == 2):
            status = "hit"
        elif largest_fp_side not in (None, side):
            status = "wrong kidney"
        else:
            status = "missed"
        tumors.append({"ml": float(g_sizes[i] * voxel_ml), "side": side, "status": status})
    counts = {k: sum(t["status"] == k for t in tumors) for k in ("hit", "missed", "wrong kidney")}
    statuses = {t["status"] for t in tumors}
    word = "no tumour" if not tumors else (statuses.pop() if len(statuses) == 1 else "partial")
    return {"n_tumors_gt": n_g, "n_tumors_hit": counts["hit"], "n_tumors_missed": counts["missed"],
            "n_tumors_wrong_kidney": counts["wrong kidney"], "n_fp_components": len(fp),
            "fp_ml": float(sum(int(p_sizes[i]) for i in fp) * voxel_ml), "detection": word, "tumors": tumors,
            "midline_x_mm": mid}


# ----------------------------------------------------------------------------- one case
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
                    affine: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of one predicted label map against its ground truth.

    Args:
        pred: predicted label map.
        gt: ground-truth label map, same shape.
        spacing: voxel spacing in mm per array axis.
        cfg: metric settings (tolerances, HD percentile); defaults to :class:`EvaluateConfig`.
        affine: the ground truth's affine, for the body sides of the detection columns (default
            :func:`kits_affine`).

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
    out.update(tumour_detection(pred, gt, kits_affine(spacing) if affine is None else affine, voxel_ml))
    out["spacing_mm"] = [float(v) for v in spacing]
    return out


def check_labels(data: np.ndarray, allowed: tuple[int, ...], path: Path) -> None:
    """Raise :class:`EvaluationError` naming ``path`` when ``data`` holds a value outside ``allowed``."""
    bad = sorted(set(np.unique(data).tolist()) - set(allowed))
    if bad:
        raise EvaluationError(f"{path}: label value(s) {', '.join(map(str, bad[:5]))} outside "
                              f"{{{', '.join(map(str, allowed))}}}")


def _load_label(path: Path):
    import nibabel as nib

    from hpc_dfs.data.checks import GeometryProblem, checked_spacing
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
    try:  # the spacing every stage uses (hpc_dfs.data.checks): pixdim, once it agrees with the affine
        spacing = checked_spacing(data.shape, img.affine, img.header.get_zooms()[:3])
    except GeometryProblem as e:
        raise EvaluationError(f"{path}: {e}") from None
    return data.astype(np.int16, copy=False), img.affine, spacing


def evaluate_files(pred_path: Path, gt_path: Path, cfg: EvaluateConfig | None = None) -> dict[str, Any]:
    """Metrics of one prediction file against one ground-truth file (spacing and affine of the ground truth).

    Raises:
        EvaluationError: a file cannot be read, holds labels outside its set, or the grids differ.
    """
    pred, p_aff, _ = _load_label(pred_path)
    gt, g_aff, spacing = _load_label(gt_path)
    check_labels(pred, PRED_LABELS, pred_path)
    check_labels(gt, GT_LABELS, gt_path)
    if pred.shape != gt.shape:
        raise EvaluationError(f"{pred_path.name} has shape {pred.shape} but {gt_path} has shape {gt.shape}; a "
                              f"prediction must be on the ground truth's grid")
    if not np.allclose(p_aff, g_aff, atol=1e-3):
        log.warning("%s: affine differs from %s (evaluating on the voxel grid anyway)", pred_path.name, gt_path)
    return evaluate_arrays(pred, gt, spacing, cfg, affine=g_aff)


def evaluate_missing(gt_path: Path, cfg: EvaluateConfig | None = None) -> dict[str, Any]:
    """A ground-truth case without a prediction, scored as an all-background prediction (KiTS)."""
    gt, g_aff, spacing = _load_label(gt_path)
    check_labels(gt, GT_LABELS, gt_path)
    row = evaluate_arrays(np.zeros_like(gt), gt, spacing, cfg, affine=g_aff)
    row["status"] = "missing prediction"
    return row


# ----------------------------------------------------------------------------- matching
def case_id_of(pred_name: str) -> str | None:
    """``prediction_00012.nii.gz`` -> ``case_00012`` (None for names that do not follow KiTS naming)."""
    m = PRED_RE.match(pred_name)
    return f"case_{m.group(1)}" if m else None


def find_ground_truth(gt_dir: Path, case_id: str) -> Path | None:
    """The ground-truth label file of ``case_id`` under ``gt_dir`` (``GT_NAMES`` in order), or None."""
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


def _header_descrip(path: Path) -> str | None:
    """The NIfTI header's ``descrip`` (predict writes its provenance there), or None when unreadable."""
    import nibabel as nib
    try:
        return bytes(nib.load(str(path)).header["descrip"].item()).decode("ascii", "replace").rstrip("\x00")
    except Exception:  # noqa: BLE001 - a damaged file is reported when the case is evaluated
        return None


def check_provenance(pred_dir: Path, pairs: list[tuple[str, Path, Path | None]]) -> None:
    """Every prediction must come from the one run that ``pred_dir/summary.json`` describes.

    A prediction is refused when its case is not an ``ok`` row of the summary (a stale file of another run, kept
    beside a run where the case failed), or when its header's ``descrip`` (``hpc-dfs <checkpoints sha>
    <input sha>``) differs from the row's. Folders without a summary, or summaries written before predict
    recorded provenance, are not checked.

    Raises:
        EvaluationError: the summary cannot be read, or some predictions are not from its run; names them.
    """
    path = pred_dir / "summary.json"
    if not path.is_file():
        return
    try:
        rows = {r.get("case_id"): r for r in json.loads(path.read_text()).get("cases", []) if isinstance(r, dict)}
    except (OSError, ValueError, AttributeError) as e:
        raise EvaluationError(f"{path}: cannot be read ({e})", code=EXIT_DATA) from None
    if not any("provenance" in r for r in rows.values()):
        return
    bad = []
    for cid, pred, _ in pairs:
        row = rows.get(cid)
        if row is None or row.get("status") != "ok":
            bad.append(f"{pred.name} ({cid} {'is not in it' if row is None else 'failed in it'})")
            continue
        want, got = (row.get("provenance") or {}).get("descrip"), _header_descrip(pred)
        if want and got is not None and got != want:
            bad.append(f"{pred.name} (its header says {got!r}, the summary {want!r})")
    if bad:
        raise EvaluationError(f"{len(bad)} prediction(s) in {pred_dir} are not from the run of {path.name} "
                              f"(provenance: another checkpoint or input): {'; '.join(bad[:4])}; remove them or "
                              "predict again", code=EXIT_DATA)


# ----------------------------------------------------------------------------- aggregation and writing
def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def summarise(cases: list[dict]) -> dict[str, Any]:
    """Mean of every metric over cases (None values left out), with counts and detection totals."""
    mean: dict[str, Any] = {"n_cases": len(cases)}
    for k in COLUMNS:
        mean[k] = _mean(c.get(k) for c in cases)
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


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return repr(float(v))


def to_csv(result: dict) -> str:
    """The per-case table as CSV: ``COLUMNS``, ``DETECTION_COLUMNS``, ``detection``, ``status``, then the mean."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    extra = [k for k in ("kidney_dice_raw", "tumor_dice_raw", "kits_score_raw") if any(k in c for c in result["cases"])]
    keys = (*COLUMNS, *extra, *DETECTION_COLUMNS)
    w.writerow(["case_id", *keys, "detection", "status"])
    for c in result["cases"] + result.get("missing_cases", []):
        w.writerow([c["case_id"], *(_csv_cell(c.get(k)) for k in keys), c.get("detection", ""),
                    c.get("status", "evaluated")])
    for label, m in (("mean_all", result.get("mean_all")), ("mean", result["mean"])):  # "mean" last
        if m is not None and (label == "mean" or m.get("n_missing")):
            w.writerow([label, *(_csv_cell(m.get(k)) for k in keys), "", f"n={m['n_cases']}"])
    return buf.getvalue()


MD_HEAD = ("case", "kidney Dice", "tumour Dice", "KiTS19 score", "mean IoU", "kidney HD95 (mm)", "tumour HD95 (mm)",
           "kidney SD", "tumour SD")
MD_KEYS = ("kidney_dice", "tumor_dice", "kits_score", "mean_iou", "kidney_hd95", "tumor_hd95", "kidney_surface_dice",
           "tumor_surface_dice")
DETECTION_HEAD = ("case", "tumour ml (truth)", "tumour ml (predicted)", "tumours", "hit", "missed", "wrong kidney",
                  "false-positive components", "false-positive ml", "detection")
DETECTION_KEYS = ("tumor_ml_gt", "tumor_ml_pred", "n_tumors_gt", "n_tumors_hit", "n_tumors_missed",
                  "n_tumors_wrong_kidney", "n_fp_components", "fp_ml", "detection")


def _md_metrics(result: dict) -> list[str]:
    lines = ["| " + " | ".join(MD_HEAD) + " |", "|" + "---|" * len(MD_HEAD)]
    for c in result["cases"]:
        lines.append("| " + " | ".join([c["case_id"], *(_fmt(c.get(k)) for k in MD_KEYS)]) + " |")
    for c in result.get("missing_cases", []):
        lines.append("| " + " | ".join([f"{c['case_id']} (no prediction)", *(_fmt(c.get(k)) for k in MD_KEYS)]) + " |")
    m = result["mean"]
    lines.append(f"| **mean (n={m['n_cases']})** | " + " | ".join(f"**{_fmt(m.get(k))}**" for k in MD_KEYS) + " |")
    ma = result.get("mean_all")
    if ma and ma.get("n_missing"):
        lines.append(f"| **mean, missing = 0 (n={ma['n_cases']})** | "
                     + " | ".join(f"**{_fmt(ma.get(k))}**" for k in MD_KEYS) + " |")
    return lines


def _md_detection(result: dict) -> list[str]:
    lines = ["", "## Tumour detection", "", "| " + " | ".join(DETECTION_HEAD) + " |",
             "|" + "---|" * len(DETECTION_HEAD)]
    for c in result["cases"] + result.get("missing_cases", []):
        lines.append("| " + " | ".join([c["case_id"], *(_fmt(c.get(k), 1) for k in DETECTION_KEYS)]) + " |")
    return lines


def to_markdown(result: dict) -> str:
    """The evaluation as markdown: metrics, tumour detection, post-processing, errors and definitions."""
    m = result["mean"]
    lines = ["# Evaluation", "",
             f"Predictions `{result['pred_dir']}` against ground truth `{result['gt_dir']}`: "
             f"{m['n_cases']} cases evaluated"
             + (f", {len(result['missing_predictions'])} without a prediction" if result.get("missing_predictions")
                else "") + ".", ""]
    lines += _md_metrics(result) + _md_detection(result)
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
        lines += ["", f"Ground-truth cases without a prediction (scored as all background in `mean, missing = 0`): "
                      f"{', '.join(result['missing_predictions'])}"]
    t = result["tolerances_mm"]
    lines += ["", f"Kidney = label > 0 (composite), tumour = label == 2. SD = surface Dice at the KiTS21 tolerances "
                  f"({t['kidney']:.3f} mm kidney, {t['tumor']:.3f} mm tumour). "
                  f"Both empty: Dice = IoU = SD = 1, HD95 = 0; "
                  f"one empty: Dice = IoU = SD = 0, HD95 undefined (-, left out of the mean: tumour HD95 over "
                  f"{m['n_cases'] - m['n_tumor_hd95_undefined']} of {m['n_cases']} cases). "
                  f"Detection: a ground-truth tumour component is hit when a voxel of it is predicted tumour, "
                  f"in the wrong kidney when not hit and the largest false-positive tumour component lies on the other "
                  f"side of the midline, else missed.", ""]
    return "\n".join(lines)


def _raw_dice(raw_dir: Path, pred_path: Path, gt_path: Path) -> dict[str, float]:
    raw_path = raw_dir / pred_path.name
    if not raw_path.exists():
        raise EvaluationError(f"raw prediction {raw_path} is missing (post-processed one exists)")
    raw_pred, _, _ = _load_label(raw_path)
    check_labels(raw_pred, PRED_LABELS, raw_path)
    gt, _, _ = _load_label(gt_path)
    if raw_pred.shape != gt.shape:
        raise EvaluationError(f"{raw_path} has shape {raw_pred.shape} but {gt_path} has {gt.shape}")
    gm, rm = region_masks(gt), region_masks(raw_pred)
    row = {"kidney_dice_raw": dice(rm["kidney"], gm["kidney"]), "tumor_dice_raw": dice(rm["tumor"], gm["tumor"])}
    row["kits_score_raw"] = (row["kidney_dice_raw"] + row["tumor_dice_raw"]) / 2
    return row


def _evaluate_one(cid: str, pred_path: Path | None, gt_path: Path | None, gt_dir: Path, raw_dir: Path | None,
                  cfg: EvaluateConfig) -> dict[str, Any]:
    if gt_path is None:
        raise EvaluationError(f"{pred_path.name} has no ground truth: none of {', '.join(GT_NAMES)} in {gt_dir / cid}")
    if pred_path is None:
        return {"case_id": cid, **evaluate_missing(gt_path, cfg)}
    row = {"case_id": cid, **evaluate_files(pred_path, gt_path, cfg)}
    if raw_dir is not None:
        row.update(_raw_dice(raw_dir, pred_path, gt_path))
    log.info("%s: kidney Dice %.4f, tumour Dice %.4f, detection %s", cid, row["kidney_dice"], row["tumor_dice"],
             row["detection"])
    return row


def _evaluate_share(work: list, gt_dir: Path, raw_dir: Path | None, cfg: EvaluateConfig) -> tuple[list, list]:
    """This rank's share of the work, gathered on every rank in case order: (rows, errors)."""
    rank, world = parallel.rank(), parallel.size()
    mine = work
    if world > 1:  # each rank evaluates a share, balanced by file size; results are gathered in case order
        from hpc_dfs.data.reader import partition_balanced
        mine = partition_balanced([(w, (w[1] or w[2]).stat().st_size) for w in work], rank, world)
    rows, errors = [], []
    for cid, pred_path, gt_path in mine:
        try:
            rows.append(_evaluate_one(cid, pred_path, gt_path, gt_dir, raw_dir, cfg))
        except EvaluationError as e:
            log.error("%s: %s", cid, e)
            errors.append({"case_id": cid, "error": str(e)})
    if world > 1:
        parts = parallel.allgather_object((rows, errors))
        rows = [r for part in parts for r in part[0]]
        errors = [e for part in parts for e in part[1]]
    return sorted(rows, key=lambda c: c["case_id"]), sorted(errors, key=lambda e: e["case_id"])


def _definitions(cfg: EvaluateConfig) -> dict[str, str]:
    return {"kidney": "label > 0", "tumor": "label == 2", "kits_score": "(kidney_dice + tumor_dice) / 2",
            "mean_iou": "(kidney_iou + tumor_iou) / 2",
            "hd95": f"MONAI compute_hausdorff_distance, percentile {cfg.hd_percentile}, mm",
            "surface_dice": "MONAI compute_surface_dice(use_subvoxels=True), KiTS21 tolerances",
            "empty": "both empty: dice=iou=surface_dice=1, hd95=0; one empty: dice=iou=surface_dice=0, "
                     "hd95=null (left out of means)",
            "detection": "6-connected components; a ground-truth tumour component is hit when a voxel of it is "
                         "predicted tumour, wrong kidney when not hit and the largest false-positive tumour component "
                         "lies on the other side of the midline (between the two largest ground-truth kidney "
                         "components, world x), else missed; a false-positive component touches no ground-truth tumour",
            "missing": "a missing prediction is scored as all background (mean_all); mean is over evaluated cases"}


def _raw_dir(pred_dir: Path, pred_raw: Path | None) -> Path | None:
    if pred_raw is not None:
        if not pred_raw.is_dir():
            raise EvaluationError(f"--pred-raw directory {pred_raw} does not exist")
        return pred_raw
    return pred_dir / "raw" if (pred_dir / "raw").is_dir() else None


def evaluate_dirs(pred_dir: Path, gt_dir: Path, cfg: EvaluateConfig | None = None,
                  pred_raw: Path | None = None) -> dict[str, Any]:
    """Evaluate every prediction in ``pred_dir`` against ``gt_dir``; returns the result dict (not written).

    Args:
        pred_dir: folder with ``prediction_XXXXX.nii.gz``.
        gt_dir: KiTS-layout folder with ``case_XXXXX/segmentation.nii.gz``.
        cfg: metric settings; ``cfg.strict`` makes a missing prediction an error.
        pred_raw: predictions before post-processing (default ``pred_dir/raw`` when it exists).

    Raises:
        EvaluationError: a folder is missing or empty, a prediction is not from the run of ``summary.json``
            (:func:`check_provenance`), or (``strict``) a ground-truth case has no prediction.
    """
    cfg = cfg or EvaluateConfig()
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    pairs, missing = match_predictions(pred_dir, gt_dir)
    check_provenance(pred_dir, pairs)
    if missing and cfg.strict:
        raise EvaluationError(f"{len(missing)} ground-truth case(s) have no prediction in {pred_dir}: "
                              f"{', '.join(missing)} (--strict)", code=EXIT_DATA)
    raw_dir = _raw_dir(pred_dir, pred_raw)
    work = pairs + [(c, None, find_ground_truth(gt_dir, c)) for c in missing]
    rows, errors = _evaluate_share(work, gt_dir, raw_dir, cfg)
    cases = [r for r in rows if r.get("status") != "missing prediction"]
    missing_rows = [r for r in rows if r.get("status") == "missing prediction"]
    if parallel.rank() == 0:
        for c in missing:
            log.warning("%s has ground truth but no prediction in %s: scored as all background in mean_all "
                        "(--strict makes it an error)", c, pred_dir)
    result: dict[str, Any] = {
        "pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "definitions": _definitions(cfg),
        "tolerances_mm": {"kidney": cfg.kidney_tolerance_mm, "tumor": cfg.tumor_tolerance_mm},
        "cases": cases, "mean": summarise(cases), "missing_cases": missing_rows,
        "mean_all": summarise_all(cases, missing_rows), "errors": errors, "missing_predictions": missing,
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
    """The folders (``type=Path``) and the :class:`EvaluateConfig` settings as flags."""
    parser.add_argument("--pred", type=Path, required=True, help="directory with prediction_XXXXX.nii.gz")
    parser.add_argument("--gt", type=Path, required=True,
                        help="KiTS-layout directory with case_XXXXX/segmentation.nii.gz")
    parser.add_argument("--out", type=Path, required=True, help="output JSON (CSV and markdown are written beside it)")
    parser.add_argument("--pred-raw", type=Path, default=None,
                        help="predictions before post-processing, to report its effect (default: PRED/raw when it "
                             "exists)")
    cfgmod.add_arguments(parser, EvaluateConfig)


def main(args: argparse.Namespace) -> int:
    """``hpc-dfs evaluate``: exit 0, or 1 when some predictions could not be evaluated.

    Raises:
        HpcDfsError: a bad setting or folder (code 2), or a missing prediction under ``--strict`` (code 3).
    """
    parallel.init(horovod=False)  # ranks + object collectives only (mpi4py under MPI launchers)
    cfg = cfgmod.from_args(EvaluateConfig, args)
    pred_dir = cfgmod.require_path(args.pred, "dir", "--pred")
    gt_dir = cfgmod.require_path(args.gt, "dir", "--gt")
    pred_raw = cfgmod.require_path(args.pred_raw, "dir", "--pred-raw") if args.pred_raw else None
    result = evaluate_dirs(pred_dir, gt_dir, cfg, pred_raw)
    if parallel.rank() != 0:
        return 1 if result["errors"] else 0
    paths = write_outputs(result, args.out)
    m, ma = result["mean"], result["mean_all"]
    if result["cases"]:
        log.info("%d cases: kidney Dice %.4f, tumour Dice %.4f, KiTS19 score %.4f; tumours %d hit, %d missed, %d in "
                 "the wrong kidney, %d false-positive components -> %s", m["n_cases"], m["kidney_dice"],
                 m["tumor_dice"], m["kits_score"], ma["n_tumors_hit"], ma["n_tumors_missed"],
                 ma["n_tumors_wrong_kidney"], ma["n_fp_components"], ", ".join(map(str, paths)))
    if ma["n_missing"]:
        log.warning("with the %d missing prediction(s) scored as all background (n=%d): kidney Dice %.4f, tumour "
                    "Dice %.4f", ma["n_missing"], ma["n_cases"], ma["kidney_dice"], ma["tumor_dice"])
    if result["errors"]:
        log.error("%d of %d predictions could not be evaluated (listed in %s)", len(result["errors"]),
                  len(result["errors"]) + len(result["cases"]), paths[0])
        return 1
    return 0
