"""Stage 2 of the cascade (refine): kidney windows at a finer in-plane spacing, for training and for predict.

The cascade (nnU-Net's KiTS19 recipe, in 2.5D): stage 1 (``locate``) segments whole slices at a coarse
spacing; each kidney it finds becomes a box (:func:`hpc_dfs.data.roi.kidney_boxes`); stage 2 (``refine``)
segments kidney and tumour inside each box at a finer in-plane spacing, with ``k`` neighbouring slices as
input channels (:func:`hpc_dfs.data.roi.context_indices`).

One transform serves both sides, so that predict reproduces training exactly:

- **preprocess** cuts a window around every *ground-truth* kidney box (:func:`refine_case`) and stores its
  slices in the shard's ``refine`` group;
- **predict** cuts a window around every kidney box of stage 1's output (:func:`refine_in_boxes`), runs
  stage 2 on it, and pastes the probabilities back (:func:`hpc_dfs.data.roi.paste` semantics: averaged where
  windows overlap, stage 1's probabilities outside every window).

Boxes and windows live in the canonical orientation of the preprocessing (``orientation``, default I,P,L),
so ``min_box_mm`` and margins are ``(z, y, x)`` whatever the file's orientation. A window is the box
(already grown by ``margin_mm``) widened in-plane, about its centre, to at least ``slice_size x spacing``
mm where the volume allows -- training windows show tissue around the kidney, not padding -- and is
resampled by :func:`hpc_dfs.data.geometry.prepare_image` at the refine ``target_spacing``. At predict time
a box larger than the training window gets a larger slice (a multiple of 16; the models are fully
convolutional), so the whole kidney is seen. Stage 2 tolerates stage 1's box errors because training
moves and scales the window content at random (the augmentation's ``translate`` and ``scale``).

The plan (``preprocessing["refine"]`` in the manifest and in every checkpoint) is plain JSON::

    {"target_spacing": [null, 1.0, 1.0], "slice_size": [128, 128], "margin_mm": 15.0,
     "min_box_mm": [30.0, 48.0, 48.0], "max_boxes": 2}
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import nibabel as nib
import numpy as np

from hpc_dfs.data import roi
from hpc_dfs.data.geometry import (canonical_transform, normalise, prepare_image, prepare_label, resample_image,
                                   restore_volume, voxel_spacing)

__all__ = ["refine_plan", "canonical_affine", "window", "refine_windows", "refine_case", "refine_in_boxes"]

_MULTIPLE = 16  # predict-time slice sizes are rounded up to this (the models pool up to 4 times)
_DIRECTIONS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def refine_plan(spatial: dict, spacing: str | float = "auto", slice_size: Sequence[int] = (128, 128),
                margin_mm: float = 15.0, min_box_mm: Sequence[float] = (30.0, 48.0, 48.0), max_boxes: int = 2) -> dict:
    """The refine plan from the dataset's spatial fingerprint.

    Args:
        spatial: the fingerprint's spatial part (``spacing.median``/``min`` are canonical ``[z, y, x]`` mm).
        spacing: in-plane spacing in mm, ``"auto"`` (the median in-plane spacing of the data set: nnU-Net's
            full-resolution target spacing) or ``"finest"`` (see :func:`hpc_dfs.data.roi.refine_spacing`).
        slice_size: ``[H, W]`` of a training window's slices (multiples of 16).
        margin_mm: added to every side of a kidney box (in z too).
        min_box_mm: least box extent ``(z, y, x)`` in mm.
        max_boxes: the largest kidney components kept (2: one per kidney).

    Raises:
        ValueError: a size, margin or spacing that cannot be used.
    """
    t = roi.refine_spacing(spatial, spacing)
    if len(slice_size) != 2 or min(slice_size) < _MULTIPLE or any(s % _MULTIPLE for s in slice_size):
        raise ValueError(f"refine slice_size must be two multiples of {_MULTIPLE}, got {list(slice_size)}")
    if margin_mm < 0 or len(min_box_mm) != 3 or min(min_box_mm) < 0 or max_boxes < 1:
        raise ValueError(f"refine needs margin_mm >= 0, three min_box_mm >= 0 and max_boxes >= 1; got {margin_mm}, "
                         f"{list(min_box_mm)}, {max_boxes}")
    return {"target_spacing": [None, round(t, 4), round(t, 4)], "slice_size": [int(s) for s in slice_size],
            "margin_mm": float(margin_mm), "min_box_mm": [float(v) for v in min_box_mm], "max_boxes": int(max_boxes)}


def canonical_affine(spacing: Sequence[float], codes: Sequence[str] = ("I", "P", "L")) -> np.ndarray:
    """An affine whose array axes have orientation ``codes`` and voxel sizes ``spacing`` (origin 0)."""
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    for j, (code, sp) in enumerate(zip(codes, spacing)):
        axis, sign = _DIRECTIONS[code]
        aff[axis, j] = sign * float(sp)
    return aff


def _to_canonical(arr: np.ndarray, affine: np.ndarray, codes: Sequence[str]) -> tuple[np.ndarray, list[float]]:
    ornt = canonical_transform(affine, codes)
    sp = voxel_spacing(affine)
    can_sp = [0.0, 0.0, 0.0]
    for i, (ax, _flip) in enumerate(ornt):
        can_sp[int(ax)] = float(sp[i])
    return nib.orientations.apply_orientation(np.asarray(arr), ornt), can_sp


def _from_canonical(arr: np.ndarray, affine: np.ndarray, codes: Sequence[str]) -> np.ndarray:
    inv = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(tuple(codes)),
                                          nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64)))
    return np.ascontiguousarray(nib.orientations.apply_orientation(arr, inv))


def window(box: roi.Box, shape: Sequence[int], spacing: Sequence[float], plan: dict,
           fit: bool) -> tuple[tuple[slice, slice, slice], list[int]]:
    """The canonical crop of a kidney box and the ``[H, W]`` slice size to resample it to.

    Args:
        box: kidney box in canonical voxels (margin included).
        shape: canonical volume shape ``(n, H, W)``.
        spacing: canonical voxel spacing ``(z, y, x)`` mm.
        plan: the refine plan.
        fit: predict time: grow the slice size (to a multiple of 16) until the whole box fits; training keeps
            the plan's ``slice_size``.
    """
    t = float(plan["target_spacing"][1])
    size = [int(s) for s in plan["slice_size"]]
    crop = [slice(box.start[0], box.stop[0])]
    for k, axis in enumerate((1, 2)):
        lo, hi = box.start[axis], box.stop[axis]
        if fit:
            size[k] = max(size[k], _MULTIPLE * int(math.ceil((hi - lo) * spacing[axis] / t / _MULTIPLE)))
        want = min(int(shape[axis]), int(math.ceil(size[k] * t / spacing[axis])))
        if hi - lo < want:  # widen about the centre, then move into the volume
            lo = min(max(0, int(round((lo + hi - want) / 2))), int(shape[axis]) - want)
            hi = lo + want
        crop.append(slice(lo, hi))
    return tuple(crop), size  # type: ignore[return-value]


def _resample_params(preprocessing: dict, size: Sequence[int]) -> dict:
    plan = preprocessing["refine"]
    return {**preprocessing, "target_spacing": plan["target_spacing"], "slice_size": [int(s) for s in size],
            "orientation": list(preprocessing.get("orientation", ["I", "P", "L"]))}


def _boxes(volume: np.ndarray, spacing: Sequence[float], plan: dict) -> list[roi.Box]:
    return roi.kidney_boxes(volume, spacing, margin_mm=plan["margin_mm"], min_size_mm=plan["min_box_mm"],
                            max_boxes=plan["max_boxes"])


def refine_windows(image: np.ndarray, label: np.ndarray, affine: np.ndarray, spatial: dict) -> dict:
    """Training windows of one case around its ground-truth kidneys (label > 0), in HU (not normalised).

    Args:
        image: native CT (HU), any orientation.
        label: native class map of the same shape.
        affine: the image's affine.
        spatial: the spatial preprocessing parameters with their ``refine`` plan (``orientation`` too).

    Returns:
        ``hu`` float32 ``(M, H, W)`` slices of all windows (padding = :data:`~hpc_dfs.data.geometry.PAD_HU`),
        ``label`` uint8 ``(M, H, W)``, ``stack`` int16 ``(M,)`` the window of each slice (2.5D neighbours never
        cross it), and ``boxes`` (JSON, canonical voxels). ``M = 0`` when the case has no kidney.
    """
    plan = spatial["refine"]
    codes = spatial.get("orientation", ["I", "P", "L"])
    img_c, sp = _to_canonical(image, affine, codes)
    lab_c, _ = _to_canonical(label, affine, codes)
    aff_c = canonical_affine(sp, codes)
    hs, ws = plan["slice_size"]
    hus, labels, stacks, boxes = [], [], [], []
    for i, box in enumerate(_boxes(lab_c, sp, plan)):  # the class map: kidney_mask takes label > 0
        crop, size = window(box, img_c.shape, sp, plan, fit=False)
        hu, geom = resample_image(np.asarray(img_c[crop], dtype=np.float32), aff_c, _resample_params(spatial, size))
        hus.append(hu)
        labels.append(prepare_label(lab_c[crop], geom))
        stacks.append(np.full(hu.shape[0], i, dtype=np.int16))
        boxes.append({**box.to_json(), "window": [[s.start, s.stop] for s in crop]})
    if not hus:
        return {"hu": np.zeros((0, hs, ws), np.float32), "label": np.zeros((0, hs, ws), np.uint8),
                "stack": np.zeros(0, np.int16), "boxes": []}
    return {"hu": np.concatenate(hus), "label": np.concatenate(labels), "stack": np.concatenate(stacks),
            "boxes": boxes}


def refine_case(image: np.ndarray, label: np.ndarray, affine: np.ndarray, preprocessing: dict) -> dict:
    """:func:`refine_windows` normalised with the preprocessing's ``intensity``: ``image`` instead of ``hu``."""
    out = refine_windows(image, label, affine, preprocessing)
    out["image"] = normalise(out.pop("hu"), preprocessing["intensity"])
    return out


def refine_in_boxes(image: np.ndarray, affine: np.ndarray, probs: np.ndarray, preprocessing: dict,
                    infer: Callable[[np.ndarray], np.ndarray], regions: bool = False,
                    blend: float = 0.0) -> tuple[np.ndarray, list[dict]]:
    """Stage 2 inside every kidney box of stage 1's probabilities; returns the new native probabilities.

    Args:
        image: native CT (HU).
        affine: its affine.
        probs: stage 1's native probabilities ``(C, *image.shape)`` (kidney = ``1 - p[0] > 0.5``).
        preprocessing: stage 2's ``preprocessing`` block (with its ``refine`` plan).
        infer: normalised slices ``(n, H, W)`` -> probabilities ``(C, n, H, W)`` (stage 2's replicas; the
            2.5D context is built inside it).
        regions: ``probs`` are region probabilities (sigmoid, :mod:`hpc_dfs.data.regions`): the kidney is the
            first region (kidney and masses) ``> 0.5``, not ``1 - p[0]``, and a window's border outside its
            slices is 0 in every region, not background.

    Returns:
        (native probabilities: stage 2's inside the windows, averaged where windows overlap, stage 1's outside;
        the boxes and windows as JSON in canonical voxels). No kidney found: stage 1's probabilities unchanged
        and an empty list.
    """
    plan = preprocessing["refine"]
    codes = preprocessing.get("orientation", ["I", "P", "L"])
    probs_c = np.stack([_to_canonical(p, affine, codes)[0] for p in probs])
    img_c, sp = _to_canonical(image, affine, codes)
    boxes = _boxes(probs_c[0] if regions else probs_c, sp, plan)
    if not boxes:
        return probs, []
    aff_c = canonical_affine(sp, codes)
    total = np.zeros_like(probs_c)
    count = np.zeros(probs_c.shape[1:], dtype=np.float32)
    found = []
    for box in boxes:
        crop, size = window(box, img_c.shape, sp, plan, fit=True)
        params = _resample_params(preprocessing, size)
        sl, geom = prepare_image(np.asarray(img_c[crop], dtype=np.float32), aff_c, params)
        total[(slice(None), *crop)] += restore_volume(infer(sl), geom, fill=[0.0] * len(probs) if regions else None)
        count[crop] += 1.0
        found.append({**box.to_json(), "window": [[s.start, s.stop] for s in crop], "slice_size": size})
    covered = count > 0
    probs_c = probs_c.copy()
    probs_c[:, covered] = (1.0 - blend) * (total[:, covered] / count[covered]) + blend * probs_c[:, covered]
    return np.stack([_from_canonical(p, affine, codes) for p in probs_c]), found
