"""Overlay pictures of a CT and its label map: axial, coronal and sagittal views (matplotlib, Agg).

    from hpc_dfs.visualize import save_overlay
    save_overlay("pred/overlay_00003.png", ct_hu, label, affine, title="case_00003")

The three planes go through the centroid of the tumour, or of the kidney when there is no tumour,
or through the middle of the volume when the label map is empty. The volume is first reoriented to
KiTS's display orientation (array axes I, P, L), whatever its affine says, so that every picture
reads the same way: axial with anterior up and the patient's right on the left (radiological
convention), coronal and sagittal with superior up. Aspect ratios follow the voxel spacing.
Kidney is drawn red and tumour blue (KiTS's colours); a ground-truth map, when given, is drawn as
contours on a second row.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from hpc_dfs import fsutil

DISPLAY_ORIENTATION = ("I", "P", "L")
CT_WINDOW = (-200.0, 300.0)          # soft-tissue window for CT in HU
COLOURS = {1: (1.0, 0.1, 0.1), 2: (0.15, 0.35, 1.0), 3: (0.1, 0.9, 0.3)}  # kidney, tumour, cyst


def to_display(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient ``volume`` (3-D) from its affine's orientation to ``DISPLAY_ORIENTATION``."""
    import nibabel.orientations as nio
    src = nio.io_orientation(affine)
    dst = nio.axcodes2ornt(DISPLAY_ORIENTATION)
    return nio.apply_orientation(volume, nio.ornt_transform(src, dst))


def display_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along the axes of :func:`to_display`'s output."""
    import nibabel.orientations as nio
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(DISPLAY_ORIENTATION))
    out = np.empty(3)
    for src_axis, (dst_axis, _) in enumerate(ornt):
        out[int(dst_axis)] = spacing[src_axis]
    return out


def focus_point(label: np.ndarray) -> tuple[tuple[int, int, int], str]:
    """Voxel through which to cut: tumour centroid, else kidney centroid, else the centre."""
    from scipy import ndimage
    for mask, what in ((label == 2, "tumour"), (label > 0, "kidney")):
        if mask.any():
            c = ndimage.center_of_mass(mask)
            return tuple(int(round(v)) for v in c), what
    return tuple(s // 2 for s in label.shape), "centre"


def _window(image: np.ndarray) -> tuple[float, float]:
    lo, hi = float(np.min(image)), float(np.max(image))
    if lo < -300 and hi > 100:  # looks like CT in HU
        return CT_WINDOW
    return (float(np.percentile(image, 1)), float(np.percentile(image, 99)) + 1e-6)


def _rgba(label2d: np.ndarray, alpha: float) -> np.ndarray:
    out = np.zeros((*label2d.shape, 4), dtype=np.float32)
    for v, rgb in COLOURS.items():
        m = label2d == v
        out[m, :3] = rgb
        out[m, 3] = alpha
    return out


def overlay_figure(image: np.ndarray, label: np.ndarray, affine: np.ndarray, title: str = "",
                   gt: np.ndarray | None = None, alpha: float = 0.45):
    """A matplotlib Figure with the three views (and a ground-truth row when ``gt`` is given)."""
    from matplotlib.figure import Figure
    img = to_display(np.asarray(image, dtype=np.float32), affine)
    lab = to_display(np.asarray(label), affine)
    ref = to_display(np.asarray(gt), affine) if gt is not None else None
    sp = display_spacing(affine)
    (z, y, x), what = focus_point(lab)
    vmin, vmax = _window(img)
    views = [("axial", img[z], lab[z], None if ref is None else ref[z], sp[1] / sp[2]),
             ("coronal", img[:, y, :], lab[:, y, :], None if ref is None else ref[:, y, :], sp[0] / sp[2]),
             ("sagittal", img[:, :, x], lab[:, :, x], None if ref is None else ref[:, :, x], sp[0] / sp[1])]
    rows = 2 if ref is not None else 1
    fig = Figure(figsize=(12, 4.3 * rows), dpi=100)
    axes = fig.subplots(rows, 3, squeeze=False)
    for col, (name, im2, lab2, ref2, aspect) in enumerate(views):
        for row in range(rows):
            ax = axes[row][col]
            ax.imshow(im2, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            shown = lab2 if row == 0 else ref2
            ax.imshow(_rgba(shown, alpha), aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name} ({'prediction' if row == 0 else 'ground truth'})" if rows == 2 else name,
                         fontsize=10)
            ax.set_axis_off()
    fig.suptitle(f"{title}  (through the {what} centroid; red kidney, blue tumour)".strip(), fontsize=11)
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    """PNG bytes of a Figure (Agg canvas; no timestamps in the metadata, so output is reproducible)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def save_overlay(path: str | Path, image: np.ndarray, label: np.ndarray, affine: np.ndarray, title: str = "",
                 gt: np.ndarray | None = None) -> Path:
    """Render :func:`overlay_figure` and write it atomically as a PNG."""
    path = Path(path)
    fsutil.write_bytes(path, figure_png(overlay_figure(image, label, affine, title=title, gt=gt)))
    return path


def plot_png(draw, figsize: Sequence[float] = (6, 4)) -> bytes:
    """PNG bytes of a one-axes figure drawn by ``draw(ax)`` (used by the report)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=tuple(figsize), dpi=100)
    ax = fig.subplots()
    draw(ax)
    fig.tight_layout()
    return figure_png(fig)
