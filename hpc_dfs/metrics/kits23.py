"""The official KiTS23 evaluation as a library: hierarchical evaluation classes, Dice, surface Dice, the CSV.

    from hpc_dfs.metrics import kits23
    row = kits23.score_case(truth, prediction, spacing)        # {"Dice_kidney": ..., "SD_tumor": ...}
    rows = kits23.score_folder(pred_dir, gt_dir)                # {case_id: row}, predictions named either way
    kits23.write_csv(pred_dir / "evaluation.csv", rows)         # the official columns and its "average" row
    kits23.summarise(rows)                                      # per-region means and the leaderboard means

What the KiTS23 organisers' code does (neheller/kits23: ``kits23/configuration/labels.py`` and
``kits23/evaluation/metrics.py``), and so what this module does:

- **Regions** (hierarchical evaluation classes, :data:`REGIONS`): kidney and masses = labels {1, 2, 3},
  masses = {2, 3}, tumour = {2}. Label 1 is kidney, 2 tumour, 3 cyst.
- **Dice** = 2 |P & G| / (|P| + |G|) on a region's boolean masks.
- **Surface Dice** at a tolerance per region (:data:`TOLERANCES_MM`: 1.0330772532390826, 1.1328796488598762
  and 1.1498198361434828 mm, published rounded as 1.0331, 1.1329, 1.1498), computed as DeepMind's
  ``surface-distance`` package does: a surface element ("surfel") is a 2x2x2 cube of neighbouring voxels
  (a cube of voxel corners) whose voxels are neither all inside nor all outside the mask; its area comes
  from the package's marching-cubes lookup table of the cube's 8-bit neighbour code, scaled by the voxel
  spacing (the same table ships with MONAI, :func:`monai.metrics.utils.get_code_to_measure_table`, which
  is where this module takes it from). Each surfel's distance to the other surface is the exact Euclidean
  distance (mm, scipy's distance transform with the spacing) from its cube to the nearest surfel cube of
  the other mask. Surface Dice = (area of the truth's surfels within the tolerance of the prediction's
  surface + area of the prediction's surfels within the tolerance of the truth's) / (total area of both).
- **Empty regions**: empty in both truth and prediction, Dice = surface Dice = 1; empty in only one, both 0.
- **Axes**: the official code reads files with SimpleITK, whose arrays hold the NIfTI axes in reverse
  order, with the spacing reversed to match. The surfel areas are the same under any permutation of the
  axes (with the spacing permuted alike; checked over all 256 codes and 6 permutations in
  ``tests/unit/test_kits23_metrics.py``), so scoring nibabel's arrays with the header zooms gives the
  official figures. As the official code, files are scored with the prediction header's spacing
  (:func:`score_files` refuses headers that disagree by more than 1e-3 mm).
- **Aggregation**: a case's row holds the 3 Dice and 3 surface Dice; the ``average`` row of
  ``evaluation.csv`` is the mean over cases of each column; the leaderboard ranks by the mean over the
  three regions of the mean Dice and of the mean surface Dice (:func:`summarise`).
- **CSV**: exactly the columns ``caseID,Dice_kidney,Dice_masses,Dice_tumor,SD_kidney,SD_masses,SD_tumor``,
  values with 8 decimals, one row per case, then ``average`` (:func:`write_csv`, written atomically).

Predictions may be named ``case_XXXXX.nii.gz`` (the challenge's submission naming) or
``prediction_XXXXX.nii.gz`` (``hpc-dfs predict``'s); :func:`find_prediction` finds either.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Optional

import numpy as np

from hpc_dfs import fsutil
from hpc_dfs.contracts.kits import CASE_RE, LABEL_NAME, PRED_RE, SUBMISSION_RE, prediction_name, submission_name
from hpc_dfs.errors import EXIT_DATA, EXIT_USAGE, HpcDfsError
from hpc_dfs.metrics.cases import load_label

__all__ = ["Region", "REGIONS", "TOLERANCES_MM", "CSV_COLUMNS", "LABELS", "Kits23Error", "region_mask", "dice",
           "area_table", "surface_dice", "score_case", "score_files", "find_prediction", "score_folder", "summarise",
           "to_csv", "write_csv"]


class Region(NamedTuple):
    """One hierarchical evaluation class: its CSV name, the labels it unites and its surface Dice tolerance."""

    name: str
    labels: tuple[int, ...]
    tolerance_mm: float


#: the hierarchical evaluation classes in the official order (kidney_and_mass, mass, tumor)
REGIONS = (Region("kidney", (1, 2, 3), 1.0330772532390826),
           Region("masses", (2, 3), 1.1328796488598762),
           Region("tumor", (2,), 1.1498198361434828))
TOLERANCES_MM = {r.name: r.tolerance_mm for r in REGIONS}
CSV_COLUMNS = ("caseID", *(f"Dice_{r.name}" for r in REGIONS), *(f"SD_{r.name}" for r in REGIONS))
#: the label values a KiTS23 map may hold: background, kidney, tumour, cyst
LABELS = (0, 1, 2, 3)
#: neighbour-code weight of each voxel of a 2x2x2 cube (the ``surface-distance`` package's encoding kernel)
_CUBE_KERNEL = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.int32)
_PRED_NAMES = (submission_name, prediction_name)   # the challenge's naming first, then hpc-dfs predict's


class Kits23Error(HpcDfsError, ValueError):
    """A case that cannot be scored (unreadable file, labels outside 0-3, grids that differ); names the file."""

    code = EXIT_DATA


# ----------------------------------------------------------------------------- one region
def region_mask(label: np.ndarray, labels: Iterable[int]) -> np.ndarray:
    """The boolean mask of the voxels whose label is one of ``labels``.

    Args:
        label: an integer label map.
        labels: the label values the region unites, e.g. ``(2, 3)`` for masses.
    """
    labels = tuple(labels)
    if len(labels) == 1:
        return label == labels[0]
    return np.isin(label, labels)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks: 1 when both are empty, 0 when only one is (the KiTS23 rule).

    Args:
        pred: predicted region mask.
        truth: ground-truth region mask, same shape.
    """
    p, g = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    if p == 0 and g == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & truth)) / (p + g)


def _union_box(a: np.ndarray, b: np.ndarray) -> Optional[tuple[slice, ...]]:
    """The bounding box of ``a | b`` (None when both are empty)."""
    union = a | b
    box = []
    for ax in range(union.ndim):
        nz = np.flatnonzero(union.any(axis=tuple(i for i in range(union.ndim) if i != ax)))
        if nz.size == 0:
            return None
        box.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)


def _surfels(mask: np.ndarray, area_of_code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The surfel cubes of a (zero-padded) mask and the area of each: (border cubes bool, area per cube)."""
    from scipy import ndimage

    code = ndimage.correlate(mask.astype(np.uint8), _CUBE_KERNEL, mode="constant", cval=0)  # codes fit in 8 bits
    border = (code != 0) & (code != 255)
    return border, area_of_code[code]


def area_table(spacing) -> np.ndarray:
    """Surfel area (mm^2, float64) of each of the 256 neighbour codes at ``spacing`` (array axes order).

    The triangle normals (whose lengths are the areas at unit spacing) are MONAI's copy of the
    ``surface-distance`` package's marching-cubes table; each normal is scaled by the products of the
    other two spacings and the lengths summed per code, in float64 as the package does (MONAI's public
    :func:`~monai.metrics.utils.get_code_to_measure_table` returns the same areas in float32, which this
    falls back on if MONAI's normals table moves).

    Args:
        spacing: voxel size in mm along the three array axes.

    Raises:
        RuntimeError: MONAI's neighbour-code kernel is not the package's (the table would be misindexed).
    """
    from monai.metrics import utils as mu

    s0, s1, s2 = (float(s) for s in spacing)
    table, kernel = mu.get_code_to_measure_table([s0, s1, s2])
    kernel = np.asarray(kernel.cpu().numpy()).reshape(2, 2, 2)
    if not np.array_equal(kernel, _CUBE_KERNEL):  # the table is indexed by this encoding; refuse any other
        raise RuntimeError(f"MONAI's neighbour-code kernel {kernel.ravel().tolist()} is not the surface-distance "
                           f"package's {_CUBE_KERNEL.ravel().tolist()}")
    normals = getattr(mu, "_get_neighbour_code_to_normals_table", None)
    if normals is None:
        return np.asarray(table.cpu().numpy(), dtype=np.float64).ravel()
    n = np.asarray(normals(None).cpu().numpy(), dtype=np.float64)  # (256, triangles, 3), multiples of 1/8: exact
    return np.linalg.norm(n * np.array([s1 * s2, s0 * s2, s0 * s1]), axis=-1).sum(axis=-1)


def surface_dice(pred: np.ndarray, truth: np.ndarray, spacing, tolerance_mm: float) -> float:
    """Surface Dice at ``tolerance_mm`` as the KiTS23 evaluation computes it (module docstring).

    Args:
        pred: predicted region mask.
        truth: ground-truth region mask, same shape.
        spacing: voxel size in mm along the array axes.
        tolerance_mm: distances up to this count as touching the other surface.

    Returns:
        1.0 when both masks are empty, 0.0 when only one is, else the surface Dice in [0, 1].
    """
    from scipy import ndimage

    box = _union_box(pred, truth)
    if box is None:
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    p, g = np.pad(pred[box], 1), np.pad(truth[box], 1)  # the union's box, one empty voxel around
    sp = tuple(float(s) for s in spacing)
    table = area_table(sp)
    border_p, area_p = _surfels(p, table)
    border_g, area_g = _surfels(g, table)
    dist_to_p = ndimage.distance_transform_edt(~border_p, sampling=sp)
    dist_to_g = ndimage.distance_transform_edt(~border_g, sampling=sp)
    a_g, d_g = area_g[border_g], dist_to_p[border_g]
    a_p, d_p = area_p[border_p], dist_to_g[border_p]
    return float((a_g[d_g <= tolerance_mm].sum() + a_p[d_p <= tolerance_mm].sum()) / (a_g.sum() + a_p.sum()))


# ----------------------------------------------------------------------------- one case
def score_case(truth: np.ndarray, pred: np.ndarray, spacing) -> dict[str, float]:
    """Dice and surface Dice of the three regions of one case (the official row, without ``caseID``).

    Args:
        truth: ground-truth label map (0-3), array axes as nibabel reads the NIfTI file.
        pred: predicted label map on the same grid.
        spacing: voxel size in mm along the array axes (the header zooms).

    Returns:
        ``{"Dice_kidney", "Dice_masses", "Dice_tumor", "SD_kidney", "SD_masses", "SD_tumor"}``.

    Raises:
        Kits23Error: the shapes differ, or the spacing is not 3 positive numbers.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape or truth.ndim != 3:
        raise Kits23Error(f"prediction shape {pred.shape} differs from ground-truth shape {truth.shape} "
                          "(both must be the same 3-D grid)")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise Kits23Error(f"voxel spacing {spacing!r} is not 3 positive numbers (mm)", code=EXIT_USAGE)
    box = _union_box(truth > 0, pred > 0)  # every region lies in it: crop once (distances do not change)
    if box is not None:
        truth, pred = truth[box], pred[box]
    row: dict[str, float] = {}
    sds: dict[str, float] = {}
    for r in REGIONS:
        g, p = region_mask(truth, r.labels), region_mask(pred, r.labels)
        row[f"Dice_{r.name}"] = dice(p, g)
        sds[f"SD_{r.name}"] = surface_dice(p, g, sp, r.tolerance_mm)
    row.update(sds)
    return row


def _read_labels(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A label map (int16) and its header zooms; refuses unreadable files and values outside :data:`LABELS`."""
    data, _, zooms = load_label(path, Kits23Error)
    if data.size and (data.min() < min(LABELS) or data.max() > max(LABELS)):  # unique() only to name them
        bad = sorted(set(np.unique(data).tolist()) - set(LABELS))
        raise Kits23Error(f"{path}: label value(s) {', '.join(str(int(b)) for b in bad[:5])} outside "
                          f"{{{', '.join(map(str, LABELS))}}} (0 background, 1 kidney, 2 tumour, 3 cyst)")
    return data, zooms


def score_files(pred_path: str | Path, gt_path: str | Path) -> dict[str, float]:
    """:func:`score_case` of two NIfTI files, with the prediction header's voxel spacing, as the official code.

    The two headers' spacings must agree to 1e-3 mm (a prediction belongs on the ground truth's grid).

    Args:
        pred_path: the predicted label map.
        gt_path: the ground-truth label map (``segmentation.nii.gz``).

    Raises:
        Kits23Error: a file cannot be read, holds labels outside 0-3, or the grids differ (names the files).
    """
    pred, spacing = _read_labels(Path(pred_path))
    truth, gt_spacing = _read_labels(Path(gt_path))
    if pred.shape != truth.shape:
        raise Kits23Error(f"{pred_path} has shape {pred.shape} but {gt_path} has {truth.shape}: a prediction must be "
                          "on the ground truth's grid")
    if not np.allclose(spacing, gt_spacing, rtol=0, atol=1e-3):
        raise Kits23Error(f"{pred_path} has voxel spacing {spacing} mm but {gt_path} has {gt_spacing}: a prediction "
                          "must be on the ground truth's grid")
    return score_case(truth, pred, spacing)


# ----------------------------------------------------------------------------- folders
def find_prediction(pred_dir: str | Path, case_id: str) -> Optional[Path]:
    """The prediction of ``case_id`` in ``pred_dir``: ``case_XXXXX.nii.gz`` or ``prediction_XXXXX.nii.gz``.

    Args:
        pred_dir: the folder of predictions.
        case_id: ``case_`` and five digits.

    Returns:
        The file, or None when neither name is there.

    Raises:
        Kits23Error: ``case_id`` is not a KiTS case id (exit 2), or both names are there with different contents
            (which one to score would be a guess).
    """
    m = CASE_RE.match(case_id)
    if not m:
        raise Kits23Error(f"{case_id!r} is not a KiTS case id (case_ and five digits)", code=EXIT_USAGE)
    found = [p for p in (Path(pred_dir) / name(case_id) for name in _PRED_NAMES) if p.is_file()]
    if len(found) == 2 and fsutil.sha256_file(found[0]) != fsutil.sha256_file(found[1]):
        raise Kits23Error(f"{found[0]} and {found[1]} are both predictions of {case_id} and differ: remove one")
    return found[0] if found else None


def _predicted_cases(pred_dir: Path) -> list[str]:
    names = (p.name for p in pred_dir.iterdir())
    return sorted({f"case_{m.group(1)}" for n in names if (m := SUBMISSION_RE.match(n) or PRED_RE.match(n))})


def score_folder(pred_dir: str | Path, gt_dir: str | Path, case_ids: Optional[Iterable[str]] = None,
                 missing: str = "error") -> dict[str, dict[str, float]]:
    """Score every prediction of a folder against ``GT/case_XXXXX/segmentation.nii.gz``.

    Args:
        pred_dir: folder of ``case_XXXXX.nii.gz`` or ``prediction_XXXXX.nii.gz`` files (an nnU-Net or challenge
            prediction folder as it is, or ``hpc-dfs predict``'s).
        gt_dir: KiTS-layout folder with the ground truth.
        case_ids: the cases to score (default: every case that has a prediction, as the official code does).
        missing: for a wanted case without a prediction, ``"error"`` or ``"empty"`` (scored as an all-background
            prediction: 0 for each region the truth has, 1 for each it lacks).

    Returns:
        ``{case_id: row}`` in case order (rows as :func:`score_case`).

    Raises:
        Kits23Error: a folder is missing or holds no prediction; a case lacks its ground truth, or (``missing=
            "error"``) its prediction; or a file cannot be scored.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise Kits23Error(f"{what} folder {d} does not exist", code=EXIT_USAGE)
    if missing not in ("error", "empty"):
        raise Kits23Error(f"missing={missing!r}: expected 'error' or 'empty'", code=EXIT_USAGE)
    wanted = sorted(case_ids) if case_ids is not None else _predicted_cases(pred_dir)
    if not wanted:
        raise Kits23Error(f"{pred_dir} holds no case_XXXXX.nii.gz or prediction_XXXXX.nii.gz file")
    rows: dict[str, dict[str, float]] = {}
    for cid in wanted:
        gt = gt_dir / cid / LABEL_NAME
        if not gt.is_file():
            raise Kits23Error(f"{cid}: no ground truth {gt}")
        pred = find_prediction(pred_dir, cid)
        if pred is not None:
            rows[cid] = score_files(pred, gt)
        elif missing == "empty":
            truth, spacing = _read_labels(gt)
            rows[cid] = score_case(truth, np.zeros_like(truth), spacing)
        else:
            raise Kits23Error(f"{cid}: no prediction in {pred_dir} (neither case_{cid[5:]}.nii.gz nor "
                              f"prediction_{cid[5:]}.nii.gz)")
    return rows


# ----------------------------------------------------------------------------- aggregation and the CSV
def summarise(rows: Mapping[str, Mapping[str, float]]) -> dict[str, float | int]:
    """Means over cases of every column, and the leaderboard's means over the three regions.

    Args:
        rows: ``{case_id: row}`` as :func:`score_folder` returns.

    Returns:
        ``{"n_cases", "Dice_kidney", ..., "SD_tumor", "mean_dice", "mean_sd"}`` where ``mean_dice`` and ``mean_sd``
        average the three regions' means (the leaderboard's two figures).

    Raises:
        Kits23Error: ``rows`` is empty.
    """
    if not rows:
        raise Kits23Error("no case to summarise")
    out: dict[str, float | int] = {"n_cases": len(rows)}
    for col in CSV_COLUMNS[1:]:
        out[col] = float(np.mean([float(r[col]) for r in rows.values()]))
    out["mean_dice"] = float(np.mean([out[f"Dice_{r.name}"] for r in REGIONS]))
    out["mean_sd"] = float(np.mean([out[f"SD_{r.name}"] for r in REGIONS]))
    return out


def to_csv(rows: Mapping[str, Mapping[str, float]]) -> str:
    """The official ``evaluation.csv`` text: header, one line per case (8 decimals), then ``average``.

    Args:
        rows: ``{case_id: row}`` as :func:`score_folder` returns.

    Raises:
        Kits23Error: ``rows`` is empty.
    """
    mean = summarise(rows)
    lines = [",".join(CSV_COLUMNS)]
    for cid, r in rows.items():
        lines.append(",".join([cid, *(f"{float(r[c]):0.8f}" for c in CSV_COLUMNS[1:])]))
    lines.append(",".join(["average", *(f"{float(mean[c]):0.8f}" for c in CSV_COLUMNS[1:])]))
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, rows: Mapping[str, Mapping[str, float]]) -> Path:
    """Write :func:`to_csv` to ``path`` atomically; returns the path.

    Raises:
        Kits23Error: ``rows`` is empty.
        hpc_dfs.fsutil.DiskWriteError: the file system refused the write.
    """
    path = Path(path)
    fsutil.write_text(path, to_csv(rows))
    return path
