"""``RUN/curves.png``: training curves (loss, Dice, risk) from ``metrics.jsonl`` rows (matplotlib)."""
from __future__ import annotations

from pathlib import Path

from hpc_dfs.fsutil import atomic_path

__all__ = ["plot_curves"]


def plot_curves(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Three panels -- loss (train/val), Dice (kidney/tumour), risk (AUC/accuracy) -- per epoch.

    Returns the path written, or None when there is nothing to plot.
    """
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("loss", [("train_loss", "train"), ("val_loss", "validation")]),
              ("Dice", [("kidney_dice", "kidney"), ("tumor_dice", "tumour")]),
              ("risk", [("risk_auc", "AUC"), ("risk_acc", "accuracy")])]
    for ax, (name, keys) in zip(axes, panels):
        for key, label in keys:
            x, y = series(key)
            if x:
                ax.plot(x, y, marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        if name != "loss":
            ax.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
