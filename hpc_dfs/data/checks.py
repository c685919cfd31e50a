"""The checks every stage makes of a volume before it uses it: one place, so that every stage agrees.

- :func:`checked_spacing`: the voxel spacing of a NIfTI, the same in preprocess, predict and evaluate. It
  is the header's ``pixdim`` once that agrees with the affine's column norms (what the resampling uses);
  a zero-length axis, a non-finite or degenerate affine (a zero column, parallel axes) or a ``pixdim``
  that contradicts the affine is a :class:`GeometryProblem`.
- :func:`check_intensities`: a CT volume whose values cannot be CT (complex, non-finite once cast to the
  float32 the shards hold, or beyond :data:`MAX_ABS_HU`) is an :class:`IntensityProblem`, raised before the
  case touches any data-set statistic (the fingerprint's clip, mean and std).

The callers wrap a problem into their own error with the case or file named (``CaseError``,
``EvaluationError``). Only numpy here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["GeometryProblem", "IntensityProblem", "checked_spacing", "check_intensities", "MAX_ABS_HU",
           "SPACING_RTOL"]

#: beyond this |value| a voxel is not CT in Hounsfield units (air -1000, metal ~ +3000..+30000)
MAX_ABS_HU = 1.0e5
#: relative disagreement allowed between the header's pixdim and the affine's column norms
SPACING_RTOL = 1e-2
_MIN_MM = 1e-6   # a column shorter than this is zero


class GeometryProblem(ValueError):
    """A volume's grid cannot be used: the message says what is wrong (the caller names case and file)."""


class IntensityProblem(ValueError):
    """A volume's values cannot be CT: the message says what is wrong (the caller names case and file)."""


def checked_spacing(shape: Sequence[int], affine: np.ndarray, zooms: Sequence[float]) -> tuple[float, ...]:
    """The voxel spacing (mm) along the array axes, after checking that the grid is usable.

    Args:
        shape: the array shape (3-D).
        affine: the 4x4 voxel -> world matrix nibabel gives.
        zooms: the header's ``pixdim`` (``header.get_zooms()``), per array axis.

    Returns:
        The spacing per array axis (the header's values, which agree with the affine).

    Raises:
        GeometryProblem: a zero-length axis, a non-finite or degenerate affine, or a pixdim that is not
            positive and finite or contradicts the affine.
    """
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise GeometryProblem(f"has a zero-length axis (shape {shape})")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise GeometryProblem("has a non-finite affine")
    cols = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    zero = [i for i in range(3) if cols[i] < _MIN_MM]
    if zero:
        raise GeometryProblem(f"has a degenerate affine: column {zero[0]} is zero (array axis {zero[0]} has no "
                              "direction or spacing)")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-6 * float(np.prod(cols)):
        raise GeometryProblem("has a degenerate affine: two array axes point the same way (singular matrix)")
    z = np.asarray([float(v) for v in tuple(zooms)[:3]], dtype=np.float64)
    if z.size != 3 or not np.all(np.isfinite(z)) or np.any(z <= 0):
        raise GeometryProblem(f"has header spacing (pixdim) {z.tolist()} that is not positive")
    if not np.allclose(z, cols, rtol=SPACING_RTOL, atol=1e-4):
        raise GeometryProblem(f"has contradictory geometry: header spacing (pixdim) "
                              f"{[round(v, 4) for v in z.tolist()]} mm but the affine says "
                              f"{[round(v, 4) for v in cols.tolist()]} mm")
    return tuple(float(v) for v in z)


def check_intensities(image: np.ndarray, slab_voxels: int = 1 << 22) -> None:
    """Refuse a volume that cannot be CT in HU, before any statistic sees it.

    Checked slab by slab along the first axis (no full-size temporary): complex values, values that are
    not finite once cast to float32 (a float64 volume times 1e40 is finite as float64 but infinite in
    the shards), and values beyond :data:`MAX_ABS_HU`.

    Args:
        image: the volume as stored (any real dtype).
        slab_voxels: voxels checked at once.

    Raises:
        IntensityProblem: the first problem found, with a count where it helps.
    """
    if np.iscomplexobj(image):
        raise IntensityProblem(f"holds complex values ({image.dtype}): CT is real-valued (an imaginary part "
                               "would be dropped silently)")
    if image.dtype.kind not in "fiub":
        raise IntensityProblem(f"holds values of type {image.dtype}, not numbers")
    if image.dtype.kind in "iub" and image.dtype.itemsize <= 2:
        return  # int16/uint16 and smaller: always finite and within MAX_ABS_HU
    per = max(1, slab_voxels // max(1, int(np.prod(image.shape[1:], dtype=np.int64))))
    n_bad = n_big = 0
    worst = 0.0
    for a in range(0, image.shape[0], per):
        with np.errstate(over="ignore", invalid="ignore"):
            slab = np.asarray(image[a:a + per]).astype(np.float32)
        ok = np.isfinite(slab)
        n_bad += int(ok.size - np.count_nonzero(ok))
        mag = np.abs(slab[ok])
        big = mag > MAX_ABS_HU
        n_big += int(np.count_nonzero(big))
        if mag.size:
            worst = max(worst, float(mag.max()))
    if n_bad:
        raise IntensityProblem(f"holds {n_bad} non-finite voxels (NaN/inf, after casting to float32)")
    if n_big:
        raise IntensityProblem(f"holds {n_big} voxels beyond +-{MAX_ABS_HU:g} (largest |value| {worst:.3g}): "
                               "implausible for CT in HU (a wrong scale or data type?)")
