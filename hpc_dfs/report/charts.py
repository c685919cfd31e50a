"""The report's pictures: training curves, ROC and calibration of the clinical models, case overlays."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hpc_dfs.contracts.kits import EVAL_LABEL_FILES, IMAGE_NAME, find_label_file, prediction_name
from hpc_dfs.contracts.prediction import case_files
from hpc_dfs.log import get_logger
from hpc_dfs.visualize import curves_figure, figure_png

__all__ = ["curves_png", "roc_png", "calibration_png", "MAX_OVERLAYS", "case_overlay", "overlay_choice"]

log = get_logger("hpc_dfs.report")


def curves_png(rows: list[dict], best_ep: int | None = None, n_val: int | None = None,
               n_risk: int | None = None) -> bytes:
    """The training curves (:func:`hpc_dfs.visualize.curves_figure`) as PNG bytes.

    Args:
        rows: metrics.jsonl rows.
        best_ep: epoch of best.pt (a dashed line in every panel).
        n_val: validation cases behind the Dice and validation loss.
        n_risk: cases with a risk label.
    """
    return figure_png(curves_figure(rows, best_ep, n_val, n_risk))





def roc_png(oof: dict, stats: dict, positive: str) -> bytes:
    """ROC of every model with the chance diagonal and the majority-class predictor's point."""
    from sklearn.metrics import roc_curve

    from hpc_dfs.visualize import plot_png

    def draw(ax):
        for m, (y, p) in oof.items():
            if m in stats:
                fpr, tpr, _ = roc_curve(y, p)
                lo, hi = stats[m]["ci"] or (math.nan, math.nan)
                ax.plot(fpr, tpr, label=f"{stats[m]['label']}: AUC {stats[m]['auc']:.2f} (95% CI {lo:.2f}-{hi:.2f})")
        ax.plot([0, 1], [0, 1], ":", color="#888", label="chance (AUC 0.5)")
        y = next(iter(oof.values()))[0]
        maj = int(np.mean(y) >= 0.5)
        ax.plot([maj], [maj], "s", color="#c60", ms=8,
                label=f"majority class ({'all ' + positive if maj else 'none ' + positive}), AUC 0.5")
        ax.set_xlabel("false-positive rate (1 - specificity)")
        ax.set_ylabel(f"true-positive rate (sensitivity for {positive})")
        ax.set_title(f"ROC, out-of-fold, positive class = {positive}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    return plot_png(draw, figsize=(6, 5))


def calibration_png(oof: dict, labels: dict, positive: str, bins: int = 5) -> bytes:
    """Reliability diagram: observed share of ``positive`` per bin of predicted probability, per model."""
    from hpc_dfs.visualize import plot_png
    edges = np.linspace(0, 1, bins + 1)

    def draw(ax):
        for m, (y, p) in oof.items():
            idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
            pts = [(float(p[idx == b].mean()), float(y[idx == b].mean()), int((idx == b).sum())) for b in range(bins)
                   if (idx == b).any()]
            if pts:
                xs, ys, ns = zip(*pts)
                ax.plot(xs, ys, marker="o", label=f"{labels.get(m, m)} (n per bin {', '.join(map(str, ns))})")
        ax.plot([0, 1], [0, 1], ":", color="#888", label="perfect calibration")
        ax.set_xlabel(f"predicted P({positive})")
        ax.set_ylabel(f"observed share {positive}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title("calibration (reliability), out-of-fold", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    return plot_png(draw, figsize=(6, 5))


MAX_OVERLAYS = 6


def case_overlay(case_id: str, evaluation: dict, pred_dir: Path | None) -> tuple[bytes | None, str]:
    """Ground truth, prediction and errors over the CT (rendered fresh), else PRED's overlay PNG; and its source."""
    import nibabel as nib

    from hpc_dfs.visualize import case_figure
    gt_dir = Path(evaluation.get("gt_dir", "")) / case_id
    pdir = Path(evaluation["pred_dir"]) if evaluation.get("pred_dir") else pred_dir
    try:
        gt_path = find_label_file(gt_dir, EVAL_LABEL_FILES)
        img_path = gt_dir / IMAGE_NAME
        pred_path = (pdir / prediction_name(case_id)) if pdir else None
        if gt_path and img_path.exists():
            img = nib.load(str(img_path))
            gt = np.asanyarray(nib.load(str(gt_path)).dataobj)
            pred = (np.asanyarray(nib.load(str(pred_path)).dataobj) if pred_path and pred_path.exists()
                    else np.zeros_like(gt))
            fig = case_figure(np.asanyarray(img.dataobj), pred, img.affine, gt=gt, title=case_id)
            return figure_png(fig), "rendered"
    except Exception as e:  # a picture must not stop the report
        log.warning("%s: cannot render the overlay (%s); using the predict overlay if any", case_id, e)
    for d in (pdir, pred_dir):
        overlay = case_files(d, case_id, raw=False, probabilities=False)["overlay"] if d else None
        if overlay and overlay.is_file():
            return overlay.read_bytes(), "predict"
    return None, ""


def overlay_choice(ranked: list[dict], limit: int = MAX_OVERLAYS) -> list[tuple[str, dict]]:
    """(tag, case): all cases when few, else the worst and the best half of ``limit`` each."""
    n = len(ranked)
    if n <= limit:
        return [("worst" if i == 0 else "best" if i == n - 1 else f"rank {i + 1} of {n}", c)
                for i, c in enumerate(ranked)]
    k = limit // 2
    return [("worst" if i == 0 else f"rank {i + 1} of {n}", c) for i, c in enumerate(ranked[:k])] + \
        [("best" if j == n - 1 else f"rank {j + 1} of {n}", ranked[j]) for j in range(n - k, n)]
