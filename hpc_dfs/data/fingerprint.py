"""Dataset fingerprint (nnU-Net style): spacings, shapes and foreground intensities of the training cases.

The spatial part (spacings, shapes, fields of view) comes from the image headers alone, so the
target spacing is known before any volume is decoded. For the intensity part, each case
contributes a small :class:`CasePart` (a bounded, seeded sample of its foreground voxels),
computed wherever the case is loaded. Both are merged **sorted by case id**, so the result does
not depend on how cases were split across MPI ranks: a 2-rank run and a 1-rank run derive the
same normalisation, bit for bit.

From the fingerprint, :func:`derive_params` builds the ``preprocessing`` block of the manifest
(target spacing, slice size, intensity clip/mean/std; see ``hpc_dfs/CONTRACTS.md``).

Usage::

    spatial = spatial_fingerprint([{"case_id": ..., "shape": ..., "spacing": ..., "n_voxels": ...}, ...])
    part = case_part(case_id, image, label, canonical_shape, canonical_spacing, n_samples=10000, seed=0)
    fp = {**spatial, "foreground": intensity_fingerprint([part, ...], percentiles=(0.5, 99.5))}
    params = derive_params(fp, cfg, classes, label_map)
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

__all__ = ["CasePart", "case_part", "spatial_fingerprint", "intensity_fingerprint", "combine", "spatial_params",
           "intensity_params", "derive_params"]


@dataclass
class CasePart:
    """What one case contributes to the fingerprint."""

    case_id: str
    shape: list[int]                 # canonical (slices, rows, cols)
    spacing: list[float]             # canonical (z, y, x) mm
    n_voxels: int
    fg_samples: np.ndarray = field(repr=False)  # float32, at most n_samples foreground HU values
    n_foreground: int = 0

    def meta(self) -> dict:
        """Everything but the samples, as plain JSON (what a shard's ``fingerprint_part`` attribute holds)."""
        return {"case_id": self.case_id, "shape": self.shape, "spacing": self.spacing, "n_voxels": self.n_voxels,
                "n_foreground": self.n_foreground}

    @classmethod
    def from_meta(cls, meta: dict, fg_samples: np.ndarray) -> "CasePart":
        """The inverse of :meth:`meta`, given the samples back.

        Args:
            meta: a dict from :meth:`meta`.
            fg_samples: the case's foreground samples.
        """
        return cls(meta["case_id"], meta["shape"], meta["spacing"], meta["n_voxels"], fg_samples, meta["n_foreground"])


def _case_seed(case_id: str, seed: int) -> list[int]:
    return [int(seed), zlib.crc32(case_id.encode())]


def _flat_foreground(label: np.ndarray, slab_voxels: int = 1 << 24) -> np.ndarray:
    """``np.flatnonzero(label.reshape(-1))`` (C-order flat indices, int64) without a flattened copy of ``label``.

    nibabel's arrays are Fortran-ordered, so ``reshape(-1)`` would copy the whole volume; this works on slabs of
    the first axis, whose indices come out in the same (C) order.
    """
    if label.ndim < 2:
        return np.flatnonzero(label)
    stride = int(np.prod(label.shape[1:], dtype=np.int64))
    per = max(1, slab_voxels // max(1, stride))
    parts = [np.ravel_multi_index(np.nonzero(label[a:a + per]), label[a:a + per].shape).astype(np.int64) + a * stride
             for a in range(0, label.shape[0], per)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def case_part(case_id: str, image: np.ndarray, label: np.ndarray, canonical_shape, canonical_spacing,
              n_samples: int = 10000, seed: int = 0) -> CasePart:
    """Sample up to ``n_samples`` foreground (label > 0) voxels with a seed derived from the case id.

    Sampling keeps the fingerprint cheap (KiTS foreground is ~1e6 voxels per case) while the
    percentiles over 100+ cases stay within a few HU of the exact ones.
    """
    idx = _flat_foreground(label)
    n_fg = int(idx.size)
    if n_fg > n_samples:
        rng = np.random.default_rng(_case_seed(case_id, seed))
        idx = np.sort(rng.choice(idx, size=n_samples, replace=False))
    samples = image[np.unravel_index(idx, image.shape)].astype(np.float32)
    return CasePart(case_id, [int(s) for s in canonical_shape], [float(s) for s in canonical_spacing],
                    int(image.size), samples, n_fg)


def spatial_fingerprint(metas: Iterable[dict]) -> dict:
    """Spacing, shape and field-of-view statistics from header facts ``{case_id, shape, spacing, n_voxels}``
    (canonical axes), merged in case-id order."""
    metas = sorted(metas, key=lambda m: m["case_id"])
    if not metas:
        raise ValueError("no readable case to compute the dataset fingerprint from")
    sp = np.array([m["spacing"] for m in metas], dtype=np.float64)
    sh = np.array([m["shape"] for m in metas], dtype=np.float64)
    fov = sh[:, 1:] * sp[:, 1:]
    return {
        "n_cases": len(metas),
        "spacing": {"median": np.median(sp, 0).tolist(), "min": sp.min(0).tolist(), "max": sp.max(0).tolist()},
        "shape": {"median": np.median(sh, 0).tolist(), "min": sh.min(0).astype(int).tolist(),
                  "max": sh.max(0).astype(int).tolist()},
        "fov_mm": {"median": np.median(fov, 0).tolist(), "max": fov.max(0).tolist()},
        "n_voxels_total": int(sum(int(m["n_voxels"]) for m in metas)),
    }


def intensity_fingerprint(parts: Iterable[CasePart], percentiles=(0.5, 99.5)) -> dict:
    """Foreground intensity statistics of the sampled voxels, merged in case-id order (nnU-Net:
    mean/std of the unclipped foreground, and the clip percentiles)."""
    parts = sorted(parts, key=lambda p: p.case_id)
    samples = np.concatenate([p.fg_samples for p in parts]).astype(np.float64) if parts else np.zeros(0)
    fg = {"n_cases": len(parts), "n_sampled": int(samples.size), "n_total": int(sum(p.n_foreground for p in parts))}
    if samples.size:
        lo, hi = np.percentile(samples, percentiles)
        fg.update(mean=float(samples.mean()), std=float(samples.std()), median=float(np.median(samples)),
                  min=float(samples.min()), max=float(samples.max()),
                  percentile_lo=float(lo), percentile_hi=float(hi), percentiles=list(percentiles))
    return fg


def combine(parts: Iterable[CasePart], percentiles=(0.5, 99.5)) -> dict:
    """Full fingerprint (spatial + foreground intensity) of case parts, in case-id order."""
    parts = list(parts)
    fp = spatial_fingerprint([p.meta() for p in parts])
    fp["foreground"] = intensity_fingerprint(parts, percentiles)
    return fp


def spatial_params(fp: dict, cfg) -> dict:
    """Target spacing and slice size from the spatial fingerprint and a ``PreprocessConfig``.

    In-plane spacing 'auto': the spacing at which the median field of view exactly fills
    ``slice_size`` (larger fields of view are centre-cropped, smaller ones padded), so anatomy has
    one scale across cases, as nnU-Net's median target spacing gives.
    """
    hs, ws = cfg.slice_size
    if cfg.in_plane_spacing == "auto":
        fov = fp["fov_mm"]["median"]
        t = round(max(fov[0] / hs, fov[1] / ws), 4)
        in_plane = [t, t]
    elif cfg.in_plane_spacing == "fit":
        in_plane = None
    else:
        in_plane = [float(cfg.in_plane_spacing)] * 2
    params = {"target_spacing": [cfg.z_spacing, *(in_plane or [None, None])],
              "in_plane_mode": "fit" if in_plane is None else "spacing",
              "slice_size": [int(hs), int(ws)],
              "orientation": ["I", "P", "L"]}
    refine = getattr(cfg, "refine", None)
    if refine is not None and refine.enabled:  # stage 2 of the cascade (hpc_dfs.data.refine)
        from hpc_dfs.data.refine import refine_plan
        params["refine"] = refine_plan(fp, refine.spacing, refine.slice_size, refine.margin_mm, refine.min_box_mm,
                                       refine.max_boxes)
    return params


def intensity_params(fg: dict, cfg) -> dict:
    """The ``intensity`` block: 'ct' (foreground percentile clip + z-score) or a fixed 'window'."""
    if cfg.intensity == "ct":
        if "mean" not in fg:
            raise ValueError("intensity=ct needs foreground voxels, but no training case has any label > 0; "
                             "use --intensity window")
        stats = [fg["percentile_lo"], fg["percentile_hi"], fg["mean"], fg["std"]]
        if not np.all(np.isfinite(stats)):  # never written: every shard, good cases too, would be NaN
            raise ValueError(f"the foreground intensity statistics are not finite (clip {stats[:2]}, mean {stats[2]}, "
                             f"std {stats[3]}): a case holds non-finite or absurd intensities")
        return {"scheme": "ct", "clip": [fg["percentile_lo"], fg["percentile_hi"]], "mean": fg["mean"],
                "std": max(fg["std"], 1e-6)}
    lo, hi = cfg.window
    return {"scheme": "window", "clip": [float(lo), float(hi)], "mean": (lo + hi) / 2.0, "std": (hi - lo) / 2.0}


def derive_params(fp: dict, cfg, classes: list[str], label_map: dict[int, int]) -> dict:
    """The manifest's ``preprocessing`` block from the fingerprint and a ``PreprocessConfig``."""
    params = spatial_params(fp, cfg)
    params.update({
        "intensity": intensity_params(fp["foreground"], cfg),
        "classes": list(classes),
        "label_map": {str(k): int(v) for k, v in sorted(label_map.items())},
        "image_interpolation": "bilinear (antialiased when downsampling)",
        "label_interpolation": "nearest",
    })
    return params
