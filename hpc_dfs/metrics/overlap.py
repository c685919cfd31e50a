"""Overlap metrics of KiTS19's regions: kidney = ``label > 0`` (kidney + tumour), tumour = ``label == 2``."""
from __future__ import annotations

import numpy as np

__all__ = ["REGIONS", "region_masks", "dice", "iou"]


REGIONS = ("kidney", "tumor")


def region_masks(label: np.ndarray) -> dict[str, np.ndarray]:
    """KiTS19 evaluation regions of a label map: kidney = ``label > 0``, tumour = ``label == 2``."""
    return {"kidney": label > 0, "tumor": label == 2}


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
