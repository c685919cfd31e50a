"""The experiment's pictures and explanations: confusion matrices, ROC, SHAP of the GRU."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hpc_dfs import fsutil
from hpc_dfs.config.clinical import ClinicalConfig
from hpc_dfs.tabular.scores import MODEL_LABELS
from hpc_dfs.tabular.table import ClinicalTableError

__all__ = ["plot_confusion_roc", "explain_fold", "rows_to_explain", "write_shap"]


def _save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with fsutil.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_confusion_roc(pred: pd.DataFrame, models: list[str], class_names: tuple[str, str], out: Path) -> None:
    """``confusion_matrices.png`` and ``roc.png`` of the pooled out-of-fold predictions.

    Args:
        pred: the rows of ``predictions.csv``.
        models: the models, in order.
        class_names: (negative, positive) class names.
        out: the output folder.
    """
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        g = pred[pred.model == m]
        ConfusionMatrixDisplay.from_predictions(g.y_true, g.y_pred, labels=[0, 1], display_labels=list(class_names),
                                                ax=ax, colorbar=False)
        ax.set_title(f"{MODEL_LABELS[m]} (pooled out-of-fold)")
    fig.tight_layout()
    _save_fig(fig, out / "confusion_matrices.png")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for m in models:
        g = pred[pred.model == m]
        RocCurveDisplay.from_predictions(g.y_true, g.y_prob, name=MODEL_LABELS[m], ax=ax)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_title("ROC, pooled out-of-fold predictions")
    _save_fig(fig, out / "roc.png")


def explain_fold(model: Any, X_train: np.ndarray, X_explain: np.ndarray, cfg: ClinicalConfig, seed: int
                 ) -> tuple[np.ndarray, float]:
    """Kernel SHAP values ``[n, F]`` of one fold's GRU (log-odds output) and the base value.

    The background is a ``cfg.shap_background``-centre k-means summary of the fold's *training*
    rows (``shap.kmeans``); KernelExplainer's efficiency constraint makes every row's values sum
    exactly to ``logit(x) - base``. KernelExplainer samples coalitions with numpy's global RNG,
    which is seeded with ``seed`` here so that runs repeat.
    """
    import shap
    import torch

    def logit(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(a), dtype=torch.float32)).double().numpy()

    background = shap.kmeans(X_train, min(cfg.shap_background, len(X_train)))
    explainer = shap.KernelExplainer(logit, background)
    np.random.seed(seed % (2 ** 32))
    values = explainer.shap_values(X_explain, nsamples=cfg.shap_samples, silent=True)
    values = np.asarray(values, dtype=float).reshape(len(X_explain), X_explain.shape[1])
    return values, float(np.asarray(explainer.expected_value).ravel()[0])


def rows_to_explain(ids_test: np.ndarray, cfg: ClinicalConfig, n_total: int, seed: int) -> np.ndarray:
    """Positions (within a test fold) that SHAP explains: a seeded share of ``cfg.shap_rows``."""
    n = len(ids_test)
    if cfg.shap_rows == 0 or cfg.shap_rows >= n_total:
        take = np.arange(n)
    else:
        k = max(1, int(math.ceil(cfg.shap_rows * n / n_total)))
        take = np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))
    if cfg.explain_id:
        extra = [i for i, v in enumerate(ids_test) if str(v) == cfg.explain_id]
        take = np.union1d(take, np.asarray(extra, dtype=int))
    return take


def write_shap(shap_df: pd.DataFrame, display: pd.DataFrame, features: list[str], pred_gru: pd.DataFrame,
                cfg: ClinicalConfig, source: Path, out: Path, log: Any) -> dict:
    """The SHAP pictures and tables of the GRU (bar, beeswarm, one patient's waterfall); returns their summary.

    Args:
        shap_df: SHAP values, one row per explained patient.
        display: the features of those patients as shown (before scaling).
        features: the feature names.
        pred_gru: the GRU's out-of-fold predictions.
        cfg: the experiment's settings (``explain_id``).
        source: the data file (named in errors).
        out: the output folder.
        log: the logger.

    Raises:
        ClinicalTableError: ``--explain-id`` is not an id of the data.
    """
    import matplotlib.pyplot as plt
    import shap

    vals = shap_df[features].to_numpy()
    importance = np.abs(vals).mean(axis=0)
    order = np.argsort(-importance)
    ranking = [{"rank": i + 1, "feature": features[j], "mean_abs_shap": float(importance[j]),
                "mean_shap": float(vals[:, j].mean())} for i, j in enumerate(order)]
    fsutil.write_text(out / "shap_values.csv", shap_df.reset_index().to_csv(index=False))

    expl = shap.Explanation(values=vals, base_values=shap_df["base_value"].to_numpy(),
                            data=display.loc[shap_df.index, features].to_numpy(dtype=float), feature_names=features)
    plt.figure()
    shap.plots.bar(expl, max_display=15, show=False)
    plt.title("Clinical-GRU: mean |SHAP| (log-odds), out-of-fold")
    _save_fig(plt.gcf(), out / "shap_bar.png")
    plt.figure()
    shap.plots.beeswarm(expl, max_display=15, show=False)
    plt.title("Clinical-GRU: SHAP per patient (log-odds), out-of-fold")
    _save_fig(plt.gcf(), out / "shap_beeswarm.png")

    # one patient: the requested id, else the most confident correct positive among those explained
    if cfg.explain_id:
        matches = [i for i in shap_df.index if str(i) == cfg.explain_id]
        if not matches:
            raise ClinicalTableError(f"--explain-id {cfg.explain_id!r} is not an id of {source}")
        pid = matches[0]
    else:
        g = pred_gru.set_index("id").loc[shap_df.index]
        tp = g[(g.y_true == 1) & (g.y_pred == 1)]
        pid = (tp if len(tp) else g).y_prob.idxmax()
    row = list(shap_df.index).index(pid)
    for stale in out.glob("shap_patient_*.png"):  # a previous run into the same folder
        if stale.name != f"shap_patient_{pid}.png":
            stale.unlink()
    plt.figure()
    shap.plots.waterfall(expl[row], max_display=12, show=False)
    plt.title(f"patient {pid}: why the GRU says {float(pred_gru.set_index('id').loc[pid, 'y_prob']):.3f}")
    _save_fig(plt.gcf(), out / f"shap_patient_{pid}.png")
    contrib = sorted(({"feature": f, "value": float(display.loc[pid, f]), "shap": float(shap_df.loc[pid, f])}
                      for f in features), key=lambda d: -abs(d["shap"]))
    patient = {"id": str(pid), "fold": int(shap_df.loc[pid, "fold"]),
               "y_true": int(pred_gru.set_index("id").loc[pid, "y_true"]),
               "y_prob": float(pred_gru.set_index("id").loc[pid, "y_prob"]),
               "base_value_logit": float(shap_df.loc[pid, "base_value"]),
               "sum_shap_logit": float(sum(d["shap"] for d in contrib)),
               "contributions": contrib, "plot": f"shap_patient_{pid}.png",
               "note": "values are the imputed, encoded (0/1 = reference/risk level) feature values"}
    fsutil.write_json(out / "shap_patient.json", patient)
    summary = {"model": "gru", "explainer": "shap.KernelExplainer",
               "output": "log-odds of the positive class", "out_of_fold": True,
               "background": f"shap.kmeans({cfg.shap_background}) of each fold's training rows",
               "samples_per_row": cfg.shap_samples,
               "n_explained": int(len(shap_df)), "ranking": ranking,
               "top5": [r["feature"] for r in ranking[:5]], "patient_id": str(pid)}
    fsutil.write_json(out / "shap_importance.json", summary)
    log.info("SHAP top risk factors (mean |SHAP|, log-odds): %s",
             ", ".join(f"{r['feature']} {r['mean_abs_shap']:.3f}" for r in ranking[:5]))
    return summary
