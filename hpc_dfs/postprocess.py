"""Connected-component clean-up of a predicted kidney/tumour label map (the paper's step 5).

    from hpc_dfs.postprocess import postprocess
    clean, info = postprocess(label, affine, PostprocessConfig(), classes=["background", "kidney", "tumor"],
                              image=ct_hu)

Three steps, applied in this order, each switchable in :class:`~hpc_dfs.config.predict.PostprocessConfig`
(``hpc-dfs predict --set postprocess.<name>=...``; ``--no-postprocess`` switches all off):

1. ``min_component_mm3``: foreground components (any label > 0) smaller than this volume are set to
   background. Tumour/cyst components smaller than it inside a surviving foreground component become
   kidney (a speck of "tumour" inside kidney tissue is almost always kidney).
2. ``largest_kidney_per_side``: the foreground is split into components; every component is put on
   the patient's left or right by the world x coordinate (RAS, from the affine) of its centroid
   against the body midline, and only the largest component on each side is kept. The midline is
   the x centroid of the body (voxels above -500 HU) when the CT is given, else the centre of the grid.
3. ``remove_mass_outside_kidney``: tumour/cyst components that do not touch the kidney label dilated
   by ``kidney_margin_mm`` (an exact Euclidean dilation in mm, via the distance transform with the
   voxel spacing) are set to background. Skipped when the prediction has no kidney label at all.

Components use scipy's default 6-connectivity (face neighbours), as nnU-Net's post-processing does.
Everything runs inside the bounding box of the foreground (plus the margin), so whole CT volumes
are cheap. The design is deliberately simple: no learned thresholds, and it only ever removes or
relabels voxels that the model called foreground.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from hpc_dfs.config.predict import PostprocessConfig

BODY_HU = -500.0


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis (column norms of the affine's 3x3 part)."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def class_indices(classes: Sequence[str] | None) -> tuple[int, list[int]]:
    """Index of the kidney class and of the mass classes (every foreground class but kidney)."""
    classes = list(classes) if classes else ["background", "kidney", "tumor"]
    if "kidney" not in classes:
        raise ValueError(f"post-processing needs a 'kidney' class, the model has {classes}")
    kidney = classes.index("kidney")
    masses = [i for i, c in enumerate(classes) if i != kidney and c != "background" and i != 0]
    return kidney, masses


def midline_x(shape: Sequence[int], affine: np.ndarray, image: np.ndarray | None = None) -> float:
    """World x (mm, RAS) of the body midline: centroid of voxels above -500 HU, else the grid centre."""
    centre = (np.asarray(shape[:3], dtype=np.float64) - 1) / 2.0
    if image is not None:
        body = np.asarray(image) > BODY_HU
        if body.any():
            centre = np.asarray(ndimage.center_of_mass(body), dtype=np.float64)
    return float((np.asarray(affine, dtype=np.float64) @ np.append(centre, 1.0))[0])


def _foreground_box(label: np.ndarray, pad: Sequence[int]) -> tuple[slice, ...] | None:
    fg = label > 0
    if not fg.any():
        return None
    box = []
    for ax in range(label.ndim):
        nz = np.flatnonzero(fg.any(axis=tuple(i for i in range(label.ndim) if i != ax)))
        box.append(slice(max(int(nz[0]) - pad[ax], 0), min(int(nz[-1]) + pad[ax] + 1, label.shape[ax])))
    return tuple(box)


def _small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Boolean mask of the connected components of ``mask`` smaller than ``min_voxels``."""
    comps, n = ndimage.label(mask)
    if not n:
        return np.zeros(mask.shape, bool)
    small = np.bincount(comps.ravel(), minlength=n + 1) < min_voxels
    small[0] = False
    return small[comps]


def remove_small_components(label: np.ndarray, min_voxels: int, kidney: int, masses: Sequence[int]) -> int:
    """In place: drop foreground components and turn mass components under ``min_voxels`` into kidney."""
    drop = _small_components(label > 0, min_voxels)
    label[drop] = 0
    relabel = _small_components(np.isin(label, masses), min_voxels)
    label[relabel] = kidney
    return int(drop.sum()) + int(relabel.sum())


def keep_largest_per_side(label: np.ndarray, affine: np.ndarray, mid_x: float,
                          offset: Sequence[int] = (0, 0, 0)) -> int:
    """In place: keep the largest foreground component left and right of ``mid_x``; returns voxels removed.

    ``offset`` is the position of ``label`` (a crop) in the full grid the affine belongs to.
    """
    fg = label > 0
    comps, n = ndimage.label(fg)
    if n <= 1:
        return 0
    ids = np.arange(1, n + 1)
    sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
    centroids = np.asarray(ndimage.center_of_mass(fg, comps, ids), dtype=np.float64) + np.asarray(offset)
    world_x = (np.c_[centroids, np.ones(n)] @ np.asarray(affine, dtype=np.float64).T)[:, 0]
    keep = np.zeros(n + 1, dtype=bool)
    for side in (world_x >= mid_x, world_x < mid_x):
        idx = np.flatnonzero(side)
        if idx.size:
            keep[ids[idx[np.argmax(sizes[idx])]]] = True  # argmax: first of equal sizes, deterministic
    drop = fg & ~keep[comps]
    label[drop] = 0
    return int(drop.sum())


def remove_masses_outside_kidney(label: np.ndarray, spacing: Sequence[float], margin_mm: float, kidney: int,
                                 masses: Sequence[int]) -> int:
    """In place: drop mass components not touching the kidney dilated by ``margin_mm``; returns voxels removed."""
    kid = label == kidney
    mass = np.isin(label, masses)
    if not kid.any() or not mass.any():
        return 0
    region = ndimage.distance_transform_edt(~kid, sampling=spacing) <= margin_mm
    comps, n = ndimage.label(mass)
    touching = np.zeros(n + 1, dtype=bool)
    touching[np.unique(comps[region & mass])] = True
    touching[0] = True
    drop = ~touching[comps]
    label[drop] = 0
    return int(drop.sum())


def postprocess(label: np.ndarray, affine: np.ndarray, cfg: PostprocessConfig | None = None,
                classes: Sequence[str] | None = None, image: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Return a cleaned copy of ``label`` and a dict of how many voxels each step changed.

    Args:
        label: integer label map on the native grid (class indices of ``classes``).
        affine: its 4x4 voxel-to-world (RAS mm) affine.
        cfg: which steps to run and their sizes; defaults to :class:`PostprocessConfig`.
        classes: class names of the model (default background, kidney, tumor).
        image: the CT in HU on the same grid, used to find the body midline (optional).
    """
    cfg = cfg or PostprocessConfig()
    out = np.array(label, copy=True)
    info: dict[str, Any] = {"enabled": cfg.enabled}
    if not cfg.enabled:
        return out, info
    kidney, masses = class_indices(classes)
    spacing = voxel_spacing(affine)
    margin = [int(math.ceil(cfg.kidney_margin_mm / s)) + 1 for s in spacing]
    # each step works on the bounding box of what is left of the foreground (a view into ``out``): once
    # scattered false positives are gone, the later steps (the distance transform above all) are cheap
    if cfg.min_component_mm3 > 0:
        box = _foreground_box(out, (0, 0, 0))
        if box is not None:
            min_vox = int(math.ceil(cfg.min_component_mm3 / float(np.prod(spacing))))
            info["small_components_voxels"] = remove_small_components(out[box], min_vox, kidney, masses)
    if cfg.largest_kidney_per_side:
        box = _foreground_box(out, (0, 0, 0))
        if box is not None:
            mid = midline_x(out.shape, affine, image)
            info["midline_x_mm"] = mid
            info["other_components_voxels"] = keep_largest_per_side(out[box], affine, mid, [b.start for b in box])
    if cfg.remove_mass_outside_kidney:
        box = _foreground_box(out, margin)
        if box is not None:
            info["masses_outside_kidney_voxels"] = remove_masses_outside_kidney(out[box], spacing, cfg.kidney_margin_mm,
                                                                                kidney, masses)
    return out, info
