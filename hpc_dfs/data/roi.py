"""Kidney regions of interest for the two-stage cascade (locate, then refine), and 2.5D slice context.

Stage 1 segments the kidneys (label > 0) on whole slices at a coarse spacing. :func:`kidney_boxes`
turns its output into at most one box per kidney: connected components, the largest two kept (a
horseshoe or merged pair is one component and gives one box), a margin in mm, a minimum size in mm,
then fitted into the volume. Stage 2 segments inside each box (:func:`crop`) at a finer spacing
(:func:`refine_spacing`), and :func:`paste` puts its probabilities back into stage 1's frame.

Stage 2 trains on crops around the *ground-truth* kidney boxes, moved and resized at random
(:func:`jitter_box`, :func:`sample_training_box`), so that it tolerates stage 1's errors.

A box is in voxels of the volume it was made on, half-open per axis ``(z, y, x)``; :meth:`Box.to_mm`
and :meth:`Box.from_mm` move it to another grid that shares the volume's corner (voxel ``i`` covers
``[i * spacing, (i + 1) * spacing)`` mm).

Usage::

    boxes = kidney_boxes(stage1_labels, spacing, margin_mm=10, min_size_mm=(30, 64, 64))
    probs = paste([model(crop(image, b)) for b in boxes], boxes, image.shape, n_classes=3)
    x = slice_context(slices, k=3)         # (n, H, W) -> (n, 3, H, W), neighbours clamped at the ends
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from hpc_dfs.errors import HpcDfsError

__all__ = ["Box", "RoiError", "kidney_mask", "kidney_boxes", "crop", "paste", "jitter_box", "sample_training_box",
           "refine_spacing", "refine_patch_size", "context_indices", "slice_context"]

Triple = Union[float, Sequence[float]]


class RoiError(HpcDfsError):
    """A box description (JSON) that cannot be used; the message names the problem."""


def _triple(v: Triple, what: str) -> tuple[float, float, float]:
    t = (float(v),) * 3 if np.isscalar(v) else tuple(float(x) for x in v)
    if len(t) != 3 or min(t) < 0:
        raise ValueError(f"{what} must be one number or three (z, y, x) numbers >= 0, got {v!r}")
    return t  # type: ignore[return-value]


# ----------------------------------------------------------------------------- boxes
@dataclass(frozen=True)
class Box:
    """A half-open voxel box ``[start, stop)`` per axis ``(z, y, x)``.

    ``voxels`` is the size of the kidney component it was made from (0 when it was not made from one).
    """

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    voxels: int = 0

    def __post_init__(self):
        object.__setattr__(self, "start", tuple(int(v) for v in self.start))
        object.__setattr__(self, "stop", tuple(int(v) for v in self.stop))
        if len(self.start) != 3 or len(self.stop) != 3 or any(b <= a for a, b in zip(self.start, self.stop)):
            raise ValueError(f"a box needs three axes with start < stop, got {self.start}, {self.stop}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def centre(self) -> tuple[float, float, float]:
        """Centre in voxel coordinates (a voxel's centre is at index + 0.5)."""
        return tuple((a + b) / 2.0 for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def inside(self, shape: Sequence[int]) -> bool:
        return all(a >= 0 and b <= n for a, b, n in zip(self.start, self.stop, shape))

    def to_json(self) -> dict:
        return {"start": list(self.start), "stop": list(self.stop), "voxels": int(self.voxels)}

    @classmethod
    def from_json(cls, d: dict) -> Box:
        """The box of :meth:`to_json`.

        Raises:
            RoiError: ``d`` is not such a box (the message says why).
        """
        try:
            return cls(tuple(d["start"]), tuple(d["stop"]), int(d.get("voxels", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise RoiError(f"not a kidney box: {d!r} ({e})") from None

    def to_mm(self, spacing: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(start, stop) in mm from the volume's corner."""
        return (tuple(a * s for a, s in zip(self.start, spacing)), tuple(b * s for b, s in zip(self.stop, spacing)))

    @classmethod
    def from_mm(cls, start_mm: Sequence[float], stop_mm: Sequence[float], spacing: Sequence[float],
                shape: Sequence[int]) -> Box:
        """The smallest box of a grid (``spacing``, ``shape``) that covers ``[start_mm, stop_mm)``, clipped to it."""
        eps = 1e-6  # a box edge on a voxel edge stays there despite rounding
        start = [min(max(0, int(math.floor(a / s + eps))), n - 1) for a, s, n in zip(start_mm, spacing, shape)]
        stop = [min(n, max(a + 1, int(math.ceil(b / s - eps)))) for a, b, s, n in zip(start, stop_mm, spacing, shape)]
        return cls(tuple(start), tuple(stop))


def _fit(lo: int, size: int, dim: int) -> tuple[int, int]:
    """An interval of ``size`` (at most ``dim``) starting near ``lo``, moved (not shrunk) into ``[0, dim)``."""
    size = min(max(1, size), dim)
    lo = min(max(0, lo), dim - size)
    return lo, lo + size


def _grown(lo: int, hi: int, margin: int, min_size: int, dim: int) -> tuple[int, int]:
    """``[lo, hi)`` grown by ``margin`` each side, then about its centre to ``min_size``, fitted into ``dim``."""
    lo, hi = lo - margin, hi + margin
    if hi - lo < min_size:
        extra = min_size - (hi - lo)
        lo -= extra // 2
        hi += extra - extra // 2
    return _fit(lo, hi - lo, dim)


def kidney_mask(volume: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Kidney voxels of a stage-1 output: a label map (``> 0``), a foreground probability (``> threshold``)
    of shape ``(n, H, W)``, or class probabilities ``(C, n, H, W)`` (``1 - p[0] > threshold``)."""
    v = np.asarray(volume)
    if v.ndim == 4:
        return (1.0 - v[0]) > threshold
    if v.ndim != 3:
        raise ValueError(f"expected a (n, H, W) label/probability volume or (C, n, H, W) probabilities, got {v.shape}")
    if v.dtype == bool:
        return v
    return v > threshold if np.issubdtype(v.dtype, np.floating) else v > 0


_SLAB_VOXELS = 1 << 22  # voxels per slab when a whole volume is scanned (bounds the temporaries)


def _cropped_mask(volume: np.ndarray,
                 threshold: float) -> tuple[tuple[int, ...], tuple[int, ...], Optional[np.ndarray]]:
    """(volume shape, crop origin, :func:`kidney_mask` of the foreground's bounding box), or a None mask without
    foreground; the whole volume's mask never exists at once (it is scanned in slabs of slices)."""
    v = np.asarray(volume)
    if v.ndim not in (3, 4):
        kidney_mask(v, threshold)  # raises the ValueError that names the shape
    lead = (slice(None),) if v.ndim == 4 else ()
    shape = tuple(int(s) for s in v.shape[-3:])
    hits = [np.zeros(d, dtype=bool) for d in shape]
    per = max(1, _SLAB_VOXELS // max(1, int(np.prod(v.shape)) // max(1, shape[0])))
    for z0 in range(0, shape[0], per):
        m = kidney_mask(v[(*lead, slice(z0, z0 + per))], threshold)
        hits[0][z0:z0 + per] |= m.any(axis=(1, 2))
        hits[1] |= m.any(axis=(0, 2))
        hits[2] |= m.any(axis=(0, 1))
    if not hits[0].any():
        return shape, (0, 0, 0), None
    bounds = [(int(np.argmax(h)), len(h) - int(np.argmax(h[::-1]))) for h in hits]
    crop = tuple(slice(a, b) for a, b in bounds)
    return shape, tuple(a for a, _ in bounds), kidney_mask(v[(*lead, *crop)], threshold)


def _component_sizes(comp: np.ndarray, n: int) -> np.ndarray:
    """Voxels of components 1..n of a label image, counted slab by slab (``np.bincount`` widens to int64)."""
    sizes = np.zeros(n + 1, dtype=np.int64)
    per = max(1, _SLAB_VOXELS // max(1, comp.size // max(1, comp.shape[0])))
    for z0 in range(0, comp.shape[0], per):
        sizes += np.bincount(comp[z0:z0 + per].reshape(-1), minlength=n + 1)
    return sizes[1:]


def kidney_boxes(volume: np.ndarray, spacing: Sequence[float], margin_mm: Triple = 10.0,
                 min_size_mm: Triple = (30.0, 64.0, 64.0), max_boxes: int = 2, min_fraction: float = 0.1,
                 threshold: float = 0.5) -> list[Box]:
    """One box per kidney of a stage-1 label or probability volume (see :func:`kidney_mask`).

    Connected components (26-connectivity); the ``max_boxes`` largest are kept if at least
    ``min_fraction`` of the largest (a stray speck beside a single kidney is dropped). A horseshoe
    kidney, or two kidneys stage 1 merged, is one component and gives one box. Each component's
    bounding box grows by ``margin_mm``, then about its centre to ``min_size_mm``, and is moved
    into the volume (shrunk only where the volume is smaller). Boxes may overlap; they are ordered
    by column (x) centre, so the order does not depend on component sizes.

    Args:
        volume: (n, H, W) labels or foreground probabilities, or (C, n, H, W) class probabilities.
        spacing: (z, y, x) voxel spacing in mm.
        margin_mm: margin per side, one number or (z, y, x).
        min_size_mm: least box extent, one number or (z, y, x).
        max_boxes: most boxes (2: one per kidney).
        min_fraction: least size of a kept component relative to the largest.
        threshold: foreground probability threshold for float input.

    Returns:
        The boxes; empty when there is no kidney voxel.

    Raises:
        ValueError: a volume of another shape, or a negative margin or size.
    """
    from scipy import ndimage

    margin = [int(math.ceil(m / s)) for m, s in zip(_triple(margin_mm, "margin_mm"), spacing)]
    min_size = [int(math.ceil(m / s)) for m, s in zip(_triple(min_size_mm, "min_size_mm"), spacing)]
    shape, origin, mask = _cropped_mask(volume, threshold)
    if mask is None:
        return []
    # components of the foreground's bounding box only: the same components, numbered in the same raster order
    comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = _component_sizes(comp, n)
    order = np.argsort(-sizes, kind="stable")[:max_boxes]
    keep = [int(i) for i in order if sizes[i] >= min_fraction * sizes[order[0]]]
    found = ndimage.find_objects(comp)
    boxes = []
    for i in keep:
        ranges = [_grown(sl.start + o, sl.stop + o, m, ms, dim)
                  for sl, o, m, ms, dim in zip(found[i], origin, margin, min_size, shape)]
        boxes.append(Box(tuple(r[0] for r in ranges), tuple(r[1] for r in ranges), int(sizes[i])))
    return sorted(boxes, key=lambda b: (b.centre[2], b.centre[1], b.centre[0]))


def crop(array, box: Box):
    """The box's region of ``array``: its last three axes are (z, y, x); leading (channel) axes are kept. A view."""
    return array[(Ellipsis, *box.slices)]


def paste(crops: Sequence[np.ndarray], boxes: Sequence[Box], shape: Sequence[int], n_classes: int) -> np.ndarray:
    """Class probabilities ``(n_classes, *shape)`` with each crop ``(n_classes, *box.shape)`` put back at its box.

    Outside every box the probability is background (class 0: 1, others 0). Where boxes overlap,
    the crops are averaged; where a single box covers a voxel its crop's values come back exactly,
    so ``paste([crop(p, b)], [b], ...)`` restores ``p`` on ``b``.

    Raises:
        ValueError: a crop whose shape is not ``(n_classes, *box.shape)`` or a box outside ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if len(crops) != len(boxes):
        raise ValueError(f"{len(crops)} crops for {len(boxes)} boxes")
    total = np.zeros((n_classes, *shape), dtype=np.float32)
    count = np.zeros(shape, dtype=np.float32)
    for c, b in zip(crops, boxes):
        c = np.asarray(c)
        if c.shape != (n_classes, *b.shape) or not b.inside(shape):
            raise ValueError(f"crop {c.shape} does not fit box {b.to_json()} of ({n_classes}, {shape})")
        total[(slice(None), *b.slices)] += c
        count[b.slices] += 1
    covered = count > 0
    out = np.zeros_like(total)
    out[0] = 1.0
    out[:, covered] = total[:, covered] / count[covered]
    return out


# ----------------------------------------------------------------------------- stage-2 training crops
def jitter_box(box: Box, shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator,
               shift_mm: Triple = (6.0, 12.0, 12.0), scale: Sequence[float] = (0.85, 1.25)) -> Box:
    """``box`` moved by up to ``shift_mm`` per axis and resized by a factor from ``scale`` (one factor
    in-plane, one along z), then moved into the volume -- stage 1's errors, simulated.

    Every number comes from ``rng`` (five uniforms per call), so a sample's crop is a function of its seed.

    Args:
        box: a ground-truth kidney box.
        shape: the volume's (n, H, W).
        spacing: (z, y, x) mm.
        rng: the sample's generator.
        shift_mm: largest move of the centre per axis, one number or (z, y, x).
        scale: [low, high] size factor.
    """
    shift = _triple(shift_mm, "shift_mm")
    u = rng.random(5)
    f_z, f_xy = (float(scale[0] + (scale[1] - scale[0]) * u[i]) for i in (0, 1))
    factors = (f_z, f_xy, f_xy)
    moves = [float(2 * u[2 + i] - 1) * shift[i] / spacing[i] for i in range(3)]
    ranges = []
    for a, b, f, d, dim in zip(box.start, box.stop, factors, moves, shape):
        size = max(1, int(round((b - a) * f)))
        centre = (a + b) / 2.0 + d
        ranges.append(_fit(int(math.floor(centre - size / 2.0 + 0.5)), size, int(dim)))
    return Box(tuple(r[0] for r in ranges), tuple(r[1] for r in ranges), box.voxels)


def sample_training_box(label: np.ndarray, spacing: Sequence[float], rng: np.random.Generator,
                        boxes: Optional[Sequence[Box]] = None, **jitter) -> Optional[Box]:
    """A stage-2 training crop: one of the ground-truth kidney boxes (drawn uniformly), jittered.

    Args:
        label: the case's (n, H, W) ground truth (kidney = label > 0).
        spacing: (z, y, x) mm.
        rng: the sample's generator.
        boxes: the ground-truth boxes if already computed (default: :func:`kidney_boxes` of ``label``).
        **jitter: ``shift_mm`` and ``scale`` of :func:`jitter_box`.

    Returns:
        The box, or None for a case without kidney.
    """
    boxes = kidney_boxes(label, spacing) if boxes is None else list(boxes)
    if not boxes:
        return None
    return jitter_box(boxes[int(rng.integers(0, len(boxes)))], label.shape, spacing, rng, **jitter)


# ----------------------------------------------------------------------------- stage-2 spacing and size
def refine_spacing(fingerprint: dict, setting: Union[str, float] = "auto", finest_mm: float = 0.0) -> float:
    """Stage 2's in-plane spacing (mm) from the dataset fingerprint (:mod:`hpc_dfs.data.fingerprint`).

    ``"auto"``: the median in-plane spacing of the training cases -- nnU-Net's full-resolution target
    spacing (its KiTS19 3d_fullres ran at the median, about 0.78 mm), the finer of the row and column
    medians. ``"finest"``: the finest in-plane spacing of any training case. A number: that spacing.
    The result is never finer than ``finest_mm`` (0: no limit), which keeps a CPU budget.

    Raises:
        ValueError: an unknown setting or a spacing that is not positive.
    """
    sp = fingerprint["spacing"]
    if setting == "auto":
        mm = min(sp["median"][1:])
    elif setting == "finest":
        mm = min(sp["min"][1:])
    else:
        try:
            mm = float(setting)
        except (TypeError, ValueError):
            raise ValueError(f"refine spacing must be 'auto', 'finest' or a number, got {setting!r}") from None
    if not mm > 0:
        raise ValueError(f"refine spacing must be positive, got {mm}")
    return float(max(mm, finest_mm))


def refine_patch_size(boxes_mm: Sequence[Sequence[float]], spacing_mm: float, percentile: float = 95.0,
                      multiple: int = 16) -> list[int]:
    """In-plane stage-2 slice size (H, W) that holds ``percentile`` % of the boxes at ``spacing_mm``,
    rounded up to a multiple of ``multiple`` (what the network's down-sampling needs).

    Args:
        boxes_mm: each box's in-plane extent ``(rows_mm, cols_mm)``, e.g. from ground-truth boxes.
    """
    ext = np.asarray(boxes_mm, dtype=np.float64).reshape(-1, 2)
    if ext.size == 0:
        raise ValueError("refine_patch_size needs at least one box")
    px = np.percentile(ext, percentile, axis=0) / float(spacing_mm)
    return [int(multiple * math.ceil(p / multiple)) for p in px]


# ----------------------------------------------------------------------------- 2.5D context
def context_indices(n: int, k: int, stack: Optional[np.ndarray] = None) -> np.ndarray:
    """``(n, k)`` slice indices: for each slice its ``k`` (odd) neighbours centred on it, clamped to ``[0, n)``.

    With ``stack`` (``(n,)``, the window of each slice; windows are contiguous runs) the neighbours are clamped
    to the slice's own window instead, so a slice never sees another kidney's window.
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"2.5D context needs an odd number of slices, got {k}")
    r = k // 2
    lo, hi = np.zeros(n, dtype=np.int64), np.full(n, max(0, n - 1), dtype=np.int64)
    if stack is not None and n:
        stack = np.asarray(stack)
        change = np.r_[True, stack[1:] != stack[:-1]]
        starts = np.flatnonzero(change)
        run = np.cumsum(change) - 1
        lo, hi = starts[run], (np.r_[starts[1:], n] - 1)[run]
    return np.clip(np.arange(n)[:, None] + np.arange(-r, r + 1)[None, :], lo[:, None], hi[:, None])


def slice_context(volume, k: int):
    """``(n, H, W)`` -> ``(n, k, H, W)``: each slice with its neighbours as channels (the first and last
    slices repeat at the ends). Works on numpy arrays and torch tensors; ``k = 1`` adds the channel axis."""
    idx = context_indices(int(volume.shape[0]), k)
    if not isinstance(volume, np.ndarray):  # a torch tensor: index with a tensor on its device
        import torch

        return volume[torch.as_tensor(idx, device=volume.device)]
    return volume[idx]
