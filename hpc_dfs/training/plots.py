"""``RUN/curves.png``: the training curves (:func:`hpc_dfs.visualize.curves_figure`) from ``metrics.jsonl`` rows."""
from __future__ import annotations

from pathlib import Path

from hpc_dfs import fsutil

__all__ = ["plot_curves"]


def plot_curves(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Write the training curves (loss, Dice, risk, learning rate per epoch) atomically as a PNG.

    Args:
        rows: ``metrics.jsonl`` rows.
        path: the PNG to write (``RUN/curves.png``).
        title: a title above the panels.

    Returns:
        The path written, or None when there is nothing to plot.

    Raises:
        hpc_dfs.fsutil.DiskWriteError: the file cannot be written.
    """
    if not rows:
        return None
    from hpc_dfs.visualize import curves_figure, figure_png
    path = Path(path)
    fsutil.write_bytes(path, figure_png(curves_figure(rows, title=title)))
    return path
