"""Overlay pictures of a CT and its label map: axial, coronal and sagittal views (matplotlib, Agg).

    from hpc_dfs.visualize import save_overlay, save_case_overlay
    save_overlay("pred/overlay_00003.png", ct_hu, label, affine, title="case_00003")
    save_case_overlay("pred/overlay_00003.png", ct_hu, label, gt, affine, title="case_00003")  # with truth

:func:`case_figure` (used by ``hpc-dfs report``, and by ``predict`` when ground truth is given) puts
ground truth, prediction and an error map side by side for each plane, cut through the centroid of
the largest ground-truth tumour component (else the predicted tumour, else the kidney). The error
map colours false negatives (truth not predicted) and false positives (predicted, not truth) apart,
for kidney and tumour. Every panel has orientation letters, and each row names its slice: index and
world position in mm (RAS, from the affine). A legend names every colour.

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
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from hpc_dfs import fsutil

DISPLAY_ORIENTATION = ("I", "P", "L")
CT_WINDOW = (-200.0, 300.0)          # soft-tissue window for CT in HU
COLOURS = {1: (1.0, 0.1, 0.1), 2: (0.15, 0.35, 1.0), 3: (0.1, 0.9, 0.3)}  # kidney, tumour, cyst
CLASS_NAMES = {1: "kidney", 2: "tumour", 3: "cyst"}
#: error-map codes: colour and legend text
ERROR_COLOURS = {1: ((1.0, 0.95, 0.0), "kidney missed (FN)"), 2: ((0.0, 0.9, 1.0), "kidney false positive (FP)"),
                 3: ((1.0, 0.5, 0.0), "tumour missed (FN)"), 4: ((1.0, 0.0, 1.0), "tumour false positive (FP)")}
#: for each plane of a display-oriented volume: (name, axis cut, RAS axis of its position, letters top,
#: bottom, left, right)
PLANES = (("axial", 0, 2, "A", "P", "R", "L"), ("coronal", 1, 1, "S", "I", "R", "L"),
          ("sagittal", 2, 0, "S", "I", "A", "P"))


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
    return _rgba_codes(label2d, COLOURS, alpha)


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


def display_affine(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxel-to-world (RAS mm) affine of :func:`to_display`'s output for a volume of ``shape``."""
    import nibabel.orientations as nio
    ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(DISPLAY_ORIENTATION))
    return np.asarray(affine, dtype=np.float64) @ nio.inv_ornt_aff(ornt, tuple(shape[:3]))


def case_focus(gt: np.ndarray | None, pred: np.ndarray) -> tuple[tuple[int, int, int], str]:
    """Voxel to cut through: centroid of the largest ground-truth tumour component, else of the largest
    predicted tumour component, else of the ground-truth (or predicted) kidney, else the centre."""
    from scipy import ndimage
    candidates = [] if gt is None else [(gt == 2, "ground-truth tumour")]
    candidates += [(pred == 2, "predicted tumour")]
    candidates += [] if gt is None else [(gt > 0, "ground-truth kidney")]
    candidates += [(pred > 0, "predicted kidney")]
    for mask, what in candidates:
        if mask.any():
            lab, n = ndimage.label(mask)
            biggest = 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
            c = ndimage.center_of_mass(lab == biggest)
            return tuple(int(round(v)) for v in c), what
    return tuple(s // 2 for s in pred.shape), "volume centre"


def error_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Codes of :data:`ERROR_COLOURS`: kidney FN 1 / FP 2 (label > 0), tumour FN 3 / FP 4 (label == 2, on top)."""
    err = np.zeros(gt.shape, dtype=np.uint8)
    err[(gt > 0) & (pred == 0)] = 1
    err[(pred > 0) & (gt == 0)] = 2
    err[(gt == 2) & (pred != 2)] = 3
    err[(pred == 2) & (gt != 2)] = 4
    return err


def _rgba_codes(codes: np.ndarray, colours: dict, alpha: float) -> np.ndarray:
    out = np.zeros((*codes.shape, 4), dtype=np.float32)
    for v, rgb in colours.items():
        m = codes == v
        out[m, :3] = rgb
        out[m, 3] = alpha
    return out


def _letters(ax, top: str, bottom: str, left: str, right: str) -> None:
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)


def _cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis)


def _plane_aspect(sp: np.ndarray, axis: int) -> float:
    rows, cols = [a for a in range(3) if a != axis]
    return float(sp[rows] / sp[cols])


def _position(dispaff: np.ndarray, focus, axis: int, ras_axis: int, n: int) -> str:
    world = dispaff @ np.append(np.asarray(focus, dtype=np.float64), 1.0)
    return f"slice {focus[axis] + 1}/{n}, {'xyz'[ras_axis]} = {world[ras_axis]:.1f} mm"


def _legend(fig, with_errors: bool) -> None:
    from matplotlib.patches import Patch
    handles = [Patch(color=COLOURS[k], label=f"{CLASS_NAMES[k]}") for k in (1, 2)]
    if with_errors:
        handles += [Patch(color=c, label=t) for c, t in ERROR_COLOURS.values()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)


def _panel_grid(figure_cls, shape, sp: np.ndarray, n_cols: int):
    """Axes, one row per plane (``n_cols`` columns), each row as tall as its plane's physical aspect; with
    ``n_cols == 0`` one row of the three planes, equal widths (returned transposed, so ``grid[plane][0]``)."""
    ratios = []
    for _, axis, *_ in PLANES:
        rows, cols = [a for a in range(3) if a != axis]
        ratios.append(shape[rows] * sp[rows] / (shape[cols] * sp[cols]))
    if n_cols == 0:
        fig = figure_cls(figsize=(12, 4.8), dpi=80)
        return fig.subplots(1, 3, squeeze=False).T
    width = 3.7
    fig = figure_cls(figsize=(width * n_cols, width * sum(ratios) + 0.6 * 3 + 1.2), dpi=80)
    return fig.subplots(3, n_cols, squeeze=False, gridspec_kw={"height_ratios": ratios})


def case_figure(image: np.ndarray, pred: np.ndarray, affine: np.ndarray, gt: np.ndarray | None = None,
                title: str = "", alpha: float = 0.45):
    """Ground truth, prediction and error map side by side (one row per plane), or the prediction alone.

    Args:
        image: the CT (HU) on the label maps' grid.
        pred: predicted label map.
        affine: voxel-to-world affine of the grid (orientation, spacing, positions in mm).
        gt: ground-truth label map; without it one row of three planes shows the prediction.
        title: first part of the figure title (the case id).
        alpha: opacity of the label colours.

    Returns:
        a matplotlib Figure (render with :func:`figure_png`).
    """
    from matplotlib.figure import Figure
    shape = np.asarray(image).shape
    img = to_display(np.asarray(image, dtype=np.float32), affine)
    lab = to_display(np.asarray(pred), affine)
    ref = to_display(np.asarray(gt), affine) if gt is not None else None
    sp, dispaff = display_spacing(affine), display_affine(affine, shape)
    focus, what = case_focus(ref, lab)
    vmin, vmax = _window(img)
    cols = [("ground truth", ref, COLOURS), ("prediction", lab, COLOURS),
            ("errors", None if ref is None else error_map(lab, ref), {k: c for k, (c, _) in ERROR_COLOURS.items()})]
    cols = cols[:3] if ref is not None else cols[1:2]
    grid = _panel_grid(Figure, img.shape, sp, len(cols) if ref is not None else 0)
    fig = grid[0][0].figure
    for r, (plane, axis, ras_axis, *letters) in enumerate(PLANES):
        pos = _position(dispaff, focus, axis, ras_axis, img.shape[axis])
        for c, (name, vol, colours) in enumerate(cols):
            ax = grid[r][c]
            ax.imshow(_cut(img, axis, focus[axis]), cmap="gray", vmin=vmin, vmax=vmax,
                      aspect=_plane_aspect(sp, axis), interpolation="nearest")
            ax.imshow(_rgba_codes(_cut(vol, axis, focus[axis]), colours, 0.85 if name == "errors" else alpha),
                      aspect=_plane_aspect(sp, axis), interpolation="nearest")
            _letters(ax, *letters)
            ax.set_title(f"{plane} {name}\n{pos}" if ref is not None else f"{plane}: {pos}", fontsize=9)
            ax.set_axis_off()
    fig.suptitle(f"{title}: through the {what} centroid".strip(": "), fontsize=11)
    _legend(fig, ref is not None)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def save_case_overlay(path: str | Path, image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None,
                      affine: np.ndarray, title: str = "") -> Path:
    """Render :func:`case_figure` (ground truth, prediction, errors) and write it atomically as a PNG.

    Args:
        path: the PNG to write (e.g. ``PRED/overlay_XXXXX.png``).
        image: the CT (HU); pred, gt: label maps on its grid (``gt`` may be None); affine: the grid's affine.
        title: the case id.
    """
    path = Path(path)
    fsutil.write_bytes(path, figure_png(case_figure(image, pred, affine, gt=gt, title=title)))
    return path


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


def is_finite_number(v) -> bool:
    """A real number that is neither NaN nor infinite (bools are not numbers here).

    Args:
        v: any value.
    """
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["epoch"], float(r[key])) for r in rows if is_finite_number(r.get(key)) and "epoch" in r]


def curves_figure(rows: list[dict], best_ep: int | None = None, n_val: int | None = None,
                  n_risk: int | None = None, title: str = ""):
    """The training curves, drawn once for ``RUN/curves.png`` and the report: loss, Dice, risk and learning rate
    per epoch from ``metrics.jsonl`` rows, the best epoch marked.

    Args:
        rows: metrics.jsonl rows.
        best_ep: epoch of best.pt (a dashed line in every panel), or None.
        n_val: validation cases behind the Dice and validation loss, or None.
        n_risk: cases with a risk label, or None (then ``n_val``).
        title: a title above the panels, or none.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    nv = f" (validation n={n_val})" if n_val else ""
    nr = f" (validation n={n_risk if n_risk is not None else n_val})" if (n_risk or n_val) else ""
    panels = [(f"loss{nv}", [("train_loss", "train"), ("val_loss", "validation")], False),
              (f"Dice, 2D slices{nv}", [("kidney_dice", "kidney"), ("masses_dice", "masses"),
                                         ("tumor_dice", "tumour")], False),
              (f"risk{nr}", [("risk_auc", "AUC"), ("risk_acc", "accuracy")], False),
              ("learning rate (effective)", [("lr", "lr")], True)]
    fig = Figure(figsize=(16, 3.8), dpi=80)
    axes = fig.subplots(1, 4)
    for ax, (name, keys, log_y) in zip(axes, panels):
        for key, label in keys:
            pts = _series(rows, key)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        if best_ep is not None:
            ax.axvline(best_ep, color="#c60", ls="--", lw=1, label=f"best epoch {best_ep}")
        if name.startswith("risk"):
            ax.axhline(0.5, color="#888", ls=":", lw=1, label="chance (AUC 0.5)")
        lr = [v for _, v in _series(rows, "lr") if v > 0]
        if log_y and lr and max(lr) > 10 * min(lr):  # a log axis only when the schedule spans a decade
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
