"""Tumour detection: ground-truth tumour components hit, missed or found in the wrong kidney; false positives."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["kits_affine", "kidney_midline_x", "tumour_detection"]


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
