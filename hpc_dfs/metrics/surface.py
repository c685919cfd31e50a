"""Surface metrics through MONAI: percentile Hausdorff distance and normalised surface Dice, in mm."""
from __future__ import annotations

import warnings

import numpy as np

__all__ = ["hausdorff", "surface_dice"]


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
