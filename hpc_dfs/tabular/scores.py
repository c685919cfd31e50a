"""Binary classification scores per fold, their mean and sd, pooled out of fold; the metrics.md table."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MODEL_LABELS", "METRICS", "binary_metrics", "summarise", "metrics_md"]


MODEL_LABELS = {"gru": "Clinical-GRU", "logistic_regression": "logistic regression",
                "random_forest": "random forest"}


METRICS = ("accuracy", "kappa", "auc", "sensitivity", "specificity", "f1", "fpr", "fnr")


def binary_metrics(y_true: Any, y_prob: Any, y_pred: Any) -> dict:
    """FPR, FNR, sensitivity, specificity, accuracy, F-score, Cohen's kappa, ROC AUC (sklearn.metrics).

    AUC is None when ``y_true`` holds one class only.
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true).astype(int)
    y_pred = np.asarray(y_pred).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    sens = skm.recall_score(y_true, y_pred, pos_label=1, zero_division=0.0)
    spec = skm.recall_score(y_true, y_pred, pos_label=0, zero_division=0.0)
    auc = skm.roc_auc_score(y_true, y_prob) if len(np.unique(y_true)) == 2 else None
    return {"accuracy": float(skm.accuracy_score(y_true, y_pred)),
            "kappa": float(skm.cohen_kappa_score(y_true, y_pred)),
            "auc": None if auc is None else float(auc),
            "sensitivity": float(sens), "specificity": float(spec),
            "f1": float(skm.f1_score(y_true, y_pred, zero_division=0.0)),
            "fpr": float(1.0 - spec), "fnr": float(1.0 - sens),
            "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn), "n": int(len(y_true))}


def summarise(pred: pd.DataFrame) -> dict:
    """Per model: metrics per fold, their mean and sd (ddof=1) and the pooled out-of-fold metrics.

    ``pred`` has the columns of ``predictions.csv``; this is what the tests recompute.
    """
    out: dict = {}
    for model, g in pred.groupby("model", sort=False):
        per_fold = []
        for fold, gf in g.groupby("fold"):
            per_fold.append({"fold": int(fold), **binary_metrics(gf["y_true"], gf["y_prob"], gf["y_pred"])})
        mean, sd = {}, {}
        for k in METRICS:
            vals = [f[k] for f in per_fold if f[k] is not None]
            mean[k] = float(np.mean(vals)) if vals else None
            sd[k] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        out[str(model)] = {"folds": per_fold, "mean": mean, "sd": sd,
                           "pooled": binary_metrics(g["y_true"], g["y_prob"], g["y_pred"])}
    return out


def _fmt(v: Any, nd: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def metrics_md(summary: dict, meta: dict) -> str:
    """``metrics.md``: the pooled and per-fold scores of every model as markdown tables.

    Args:
        summary: :func:`summarise`'s result per model.
        meta: the experiment's metadata (data file, rows, classes, folds).
    """
    lines = [f"# Clinical models: {meta['data']['file']}", "",
             f"{meta['data']['n_rows']} rows ({meta['data']['n_positive']} {meta['data']['positive_class']}, "
             f"{meta['data']['n_negative']} {meta['data']['negative_class']}), {meta['data']['n_features']} features, "
             f"stratified {meta['folds']}-fold CV, seed {meta['seed']}.", "",
             "## Pooled out-of-fold", "",
             "| model | accuracy | kappa | ROC AUC | sensitivity | specificity | F1 | FPR | FNR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        p = s["pooled"]
        lines.append(f"| {MODEL_LABELS[m]} | " + " | ".join(_fmt(p[k]) for k in
                     ("accuracy", "kappa", "auc", "sensitivity", "specificity", "f1", "fpr", "fnr")) + " |")
    lines += ["", "## Mean ± sd over folds", "",
              "| model | accuracy | kappa | ROC AUC | sensitivity | specificity | F1 |",
              "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        cells = [f"{_fmt(s['mean'][k])} ± {_fmt(s['sd'][k])}" for k in
                 ("accuracy", "kappa", "auc", "sensitivity", "specificity", "f1")]
        lines.append(f"| {MODEL_LABELS[m]} | " + " | ".join(cells) + " |")
    if "gru" in summary:
        lines += ["", f"Clinical-GRU parameters: {meta['models']['gru']['n_params']:,}."]
    return "\n".join(lines) + "\n"
