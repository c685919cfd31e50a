"""The exact training transform of a CT volume into fixed-size axial slices, and its inverse.

Forward (:func:`prepare_image`, :func:`prepare_label`):

1. reorient the array to the canonical KiTS orientation (axes slices, rows, cols; codes I,P,L) with
   nibabel's orientation tools (a permutation and flips: no interpolation);
2. resample in-plane to the target spacing (image bilinear, antialiased when shrinking; labels
   nearest) and, if a slice spacing is set, along z (image linear; labels nearest);
3. centre pad/crop every slice to ``slice_size``;
4. normalise the image: clip to ``intensity.clip``, subtract ``mean``, divide by ``std``.

Inverse (:func:`restore_volume`, :func:`restore_labels`): undo 3, 2 and 1 with the stored
``geometry`` dict, so a prediction has exactly the input's array shape and lies on its grid.

Resampling uses ``torch.nn.functional.interpolate`` (vectorised, bounded memory by processing
slabs of slices). Label resampling uses precomputed nearest-neighbour index maps in numpy: they are
exact, keep the integer dtype, and follow the same pixel-centre convention as torch's
``nearest-exact`` and ``align_corners=False`` bilinear, so image and label stay aligned.

Usage::

    slices, geometry = prepare_image(image, affine, manifest["preprocessing"])   # (n, H, W) float32
    labels = prepare_label(label, geometry)                                     # (n, H, W) uint8
    probs_native = restore_volume(probs, geometry)                              # (C, *image.shape)
"""
from __future__ import annotations

from typing import Optional, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["prepare_image", "resample_image", "normalise", "PAD_HU", "prepare_label", "restore_volume",
           "restore_labels", "make_geometry", "canonical_transform", "voxel_spacing"]

_SLAB = 32  # slices interpolated at once: bounds memory on 512x512x1000 volumes
_SLAB_VOXELS = 1 << 21  # at most this many voxels per slice slab of resample_image (8 MB as float32)
#                          and prepare_label


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along the array axes, from the affine's column norms."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def canonical_transform(affine: np.ndarray, codes: Sequence[str] = ("I", "P", "L")) -> np.ndarray:
    """nibabel orientation transform from the array's orientation to ``codes``."""
    src = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    dst = nib.orientations.axcodes2ornt(tuple(codes))
    return nib.orientations.ornt_transform(src, dst)


def make_geometry(native_shape: Sequence[int], affine: np.ndarray, params: dict) -> dict:
    """Everything needed to go to slices and back, as plain JSON types."""
    codes = params.get("orientation", ["I", "P", "L"])
    ornt = canonical_transform(affine, codes)
    native_sp = voxel_spacing(affine)
    can_shape = [0, 0, 0]
    can_sp = [0.0, 0.0, 0.0]
    for i, (ax, _flip) in enumerate(ornt):
        can_shape[int(ax)] = int(native_shape[i])
        can_sp[int(ax)] = float(native_sp[i])
    n, h, w = can_shape
    sz, sy, sx = can_sp
    hs, ws = (int(v) for v in params["slice_size"])
    tz, ty, tx = params.get("target_spacing", [None, None, None])
    if ty is None or tx is None:  # 'fit': the whole field of view fits the slice, aspect kept
        t = max(h * sy / hs, w * sx / ws)
        ty = tx = t
    h2 = max(1, int(round(h * sy / ty)))
    w2 = max(1, int(round(w * sx / tx)))
    n2 = n if tz is None else max(1, int(round(n * sz / tz)))
    return {
        "native_shape": [int(s) for s in native_shape],
        "affine": np.asarray(affine, dtype=np.float64).tolist(),
        "codes": list(codes),
        "ornt": ornt.astype(int).tolist(),
        "canonical_shape": can_shape,
        "canonical_spacing": can_sp,
        "resampled_shape": [n2, h2, w2],
        "spacing": [sz if tz is None else float(tz), float(ty), float(tx)],
        "slice_size": [hs, ws],
        # slice pixel (i, j) = resampled pixel (i + offset[0], j + offset[1]); negative = padding
        "offset": [(h2 - hs) // 2, (w2 - ws) // 2],
    }


def _to_canonical(arr: np.ndarray, geometry: dict) -> np.ndarray:
    return nib.orientations.apply_orientation(arr, np.asarray(geometry["ornt"]))


def _window(size_out: int, size_src: int, offset: int) -> tuple[slice, slice]:
    """(source slice, destination slice) of the overlap of a centred pad/crop."""
    s0, s1 = max(0, offset), min(size_src, offset + size_out)
    return slice(s0, s1), slice(s0 - offset, s1 - offset)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch 'nearest-exact' source indices: floor((i + 0.5) * n_in / n_out)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


PAD_HU = -32768.0  # fill of the padded border before normalisation: the clip maps it to the clip floor


def resample_image(image: np.ndarray, affine: np.ndarray, params: dict) -> tuple[np.ndarray, dict]:
    """Steps 1-3 of :func:`prepare_image`: slices in HU (float32), padding = :data:`PAD_HU`.

    Needs only the spatial part of ``params`` (``slice_size``, ``target_spacing``, ``orientation``).
    """
    geom = make_geometry(image.shape, affine, params)
    can = _to_canonical(np.asarray(image), geom)
    n2, h2, w2 = geom["resampled_shape"]
    hs, ws = geom["slice_size"]
    oy, ox = geom["offset"]
    (sy_src, sy_dst), (sx_src, sx_dst) = _window(hs, h2, oy), _window(ws, w2, ox)
    n = can.shape[0]
    hu = np.full((n, hs, ws), PAD_HU, dtype=np.float32)
    same = (h2, w2) == can.shape[1:]
    # slices are interpolated independently, so the slab size changes memory only (<= _SLAB_VOXELS float32 in,
    # as many out), never a value
    step = max(1, min(_SLAB, _SLAB_VOXELS // max(1, can.shape[1] * can.shape[2], h2 * w2)))
    for z0 in range(0, n, step):  # in-plane resampling, slab by slab, then the centred crop/pad
        slab = torch.from_numpy(np.ascontiguousarray(can[z0:z0 + step], dtype=np.float32))
        if not same:
            shrink = h2 < can.shape[1] or w2 < can.shape[2]
            slab = F.interpolate(slab[:, None], size=(h2, w2), mode="bilinear", align_corners=False,
                                 antialias=shrink)[:, 0]
        hu[z0:z0 + step, sy_dst, sx_dst] = slab[:, sy_src, sx_src].numpy()
    if n2 != n:  # along z (linear), only when a slice spacing is set
        t = torch.from_numpy(hu).permute(1, 2, 0).reshape(1, hs * ws, n)
        hu = F.interpolate(t, size=n2, mode="linear", align_corners=False).reshape(hs, ws, n2).permute(2, 0, 1)
        hu = np.ascontiguousarray(hu.numpy())
    return hu, geom


def normalise(hu: np.ndarray, intensity: dict) -> np.ndarray:
    """Step 4 of :func:`prepare_image`, in place: clip to ``intensity.clip``, then ``(x - mean) / std``."""
    lo, hi = (float(v) for v in intensity["clip"])
    np.clip(hu, lo, hi, out=hu)
    hu -= float(intensity["mean"])
    hu /= float(intensity["std"])
    return hu


def prepare_image(image: np.ndarray, affine: np.ndarray, params: dict) -> tuple[np.ndarray, dict]:
    """Native CT (HU) -> normalised slices ``(n, H, W)`` float32 and the geometry to invert it.

    Args:
        image: 3-D array as stored in the NIfTI (any orientation).
        affine: its 4x4 affine.
        params: the manifest's ``preprocessing`` block.

    The padded border (field of view smaller than the slice) reads ``(clip[0] - mean) / std``.
    """
    hu, geom = resample_image(image, affine, params)
    return normalise(hu, params["intensity"]), geom


def prepare_label(label: np.ndarray, geometry: dict) -> np.ndarray:
    """Native class map -> ``(n, H, W)`` uint8 slices on exactly the image's slice grid (nearest)."""
    can = _to_canonical(np.asarray(label), geometry)
    n, h, w = can.shape
    n2, h2, w2 = geometry["resampled_shape"]
    hs, ws = geometry["slice_size"]
    oy, ox = geometry["offset"]
    (sy_src, sy_dst), (sx_src, sx_dst) = _window(hs, h2, oy), _window(ws, w2, ox)
    iz = _nearest_index(n, n2)
    iy = _nearest_index(h, h2)[sy_src]
    ix = _nearest_index(w, w2)[sx_src]
    out = np.zeros((n2, hs, ws), dtype=np.uint8)
    step = max(1, min(_SLAB, _SLAB_VOXELS // max(1, h * w)))  # a gather: the slab size changes no value
    for z0 in range(0, n2, step):
        zz = iz[z0:z0 + step]
        out[z0:z0 + step, sy_dst, sx_dst] = can[zz][:, iy][:, :, ix]
    return out


def _inverse_ornt(geometry: dict) -> np.ndarray:
    """Orientation transform from the canonical codes back to the native array axes."""
    return nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(tuple(geometry.get("codes", "IPL"))),
                                           nib.orientations.io_orientation(np.asarray(geometry["affine"])))


def _uncrop(x: torch.Tensor, geometry: dict, fill: Sequence[float]) -> torch.Tensor:
    """(C, n2, H, W) slices -> (C, n2, h2, w2) resampled grid; outside the slice window = fill."""
    c, n2 = x.shape[:2]
    _, h2, w2 = geometry["resampled_shape"]
    hs, ws = geometry["slice_size"]
    oy, ox = geometry["offset"]
    (sy_src, sy_dst), (sx_src, sx_dst) = _window(hs, h2, oy), _window(ws, w2, ox)
    out = torch.empty((c, n2, h2, w2), dtype=x.dtype)
    for ch in range(c):
        out[ch].fill_(float(fill[ch]))
    out[:, :, sy_src, sx_src] = x[:, :, sy_dst, sx_dst]
    return out


def restore_volume(probs, geometry: dict, fill: Optional[Sequence[float]] = None) -> np.ndarray:
    """Slice-space maps ``(C, n, H, W)`` -> native ``(C, *native_shape)`` float32 (bilinear/linear).

    Args:
        probs: per-class probabilities (numpy or torch) on the slices made by :func:`prepare_image`.
        geometry: the geometry dict returned with those slices.
        fill: value per channel outside the slice window (cropped border); default background
            probability 1 (channel 0) and 0 for the other channels.
    """
    x = torch.as_tensor(np.asarray(probs) if not torch.is_tensor(probs) else probs).float().cpu()
    c = x.shape[0]
    if list(x.shape[1:]) != [geometry["resampled_shape"][0], *geometry["slice_size"]]:
        raise ValueError(f"restore_volume: expected (C, {geometry['resampled_shape'][0]}, "
                         f"{geometry['slice_size'][0]}, {geometry['slice_size'][1]}), got {tuple(x.shape)}")
    fill = list(fill) if fill is not None else [1.0] + [0.0] * (c - 1)
    x = _uncrop(x, geometry, fill)
    n, h, w = geometry["canonical_shape"]
    n2, h2, w2 = geometry["resampled_shape"]
    if n2 != n:
        t = x.permute(0, 2, 3, 1).reshape(1, c * h2 * w2, n2)
        x = F.interpolate(t, size=n, mode="linear", align_corners=False).reshape(c, h2, w2, n).permute(0, 3, 1, 2)
    out = np.empty((c, n, h, w), dtype=np.float32)
    for z0 in range(0, n, _SLAB):
        slab = x[:, z0:z0 + _SLAB]
        if (h2, w2) != (h, w):
            k = slab.shape[1]
            slab = F.interpolate(slab.reshape(c * k, 1, h2, w2), size=(h, w), mode="bilinear",
                                 align_corners=False).reshape(c, k, h, w)
        out[:, z0:z0 + _SLAB] = slab.numpy()
    inv = _inverse_ornt(geometry)
    native = np.stack([nib.orientations.apply_orientation(out[ch], inv) for ch in range(c)])
    assert list(native.shape[1:]) == geometry["native_shape"], (native.shape, geometry["native_shape"])
    return np.ascontiguousarray(native)


def restore_labels(labels, geometry: dict) -> np.ndarray:
    """Slice-space class map ``(n, H, W)`` -> native class map (uint8, nearest); outside = 0."""
    lab = np.asarray(labels).astype(np.uint8)
    n, h, w = geometry["canonical_shape"]
    n2, h2, w2 = geometry["resampled_shape"]
    x = _uncrop(torch.from_numpy(lab)[None], geometry, [0]).numpy()[0]
    iz, iy, ix = _nearest_index(n2, n), _nearest_index(h2, h), _nearest_index(w2, w)
    out = x[iz][:, iy][:, :, ix]
    return np.ascontiguousarray(nib.orientations.apply_orientation(out, _inverse_ornt(geometry)).astype(np.uint8))
