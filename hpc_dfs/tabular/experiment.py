"""The k-fold experiment: the GRU beside sklearn baselines on the same folds, out-of-fold predictions, SHAP."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hpc_dfs import fsutil
from hpc_dfs.config import to_dict
from hpc_dfs.config.clinical import ClinicalConfig
from hpc_dfs.tabular.figures import explain_fold, plot_confusion_roc, rows_to_explain, write_shap
from hpc_dfs.tabular.gru import gru_proba, train_gru
from hpc_dfs.tabular.preprocessor import build_preprocessor, feature_names
from hpc_dfs.tabular.scores import MODEL_LABELS, metrics_md, summarise
from hpc_dfs.tabular.table import ClinicalData, load_data

__all__ = ["run"]


@dataclass
class _OutOfFold:
    """What the folds collect: prediction rows, per-fold facts and the GRU's SHAP parts."""

    rows: list[pd.DataFrame] = field(default_factory=list)
    fold_info: list[dict] = field(default_factory=list)
    shap_parts: list[pd.DataFrame] = field(default_factory=list)
    display_parts: list[pd.DataFrame] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    n_params: int | None = None


def _baseline_proba(m: str, A_tr: np.ndarray, y_tr: np.ndarray, A_te: np.ndarray, cfg: ClinicalConfig) -> np.ndarray:
    """Test-row probabilities of baseline ``m`` (logistic regression or random forest) fitted on the training rows."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    if m == "logistic_regression":
        clf = LogisticRegression(max_iter=5000).fit(A_tr, y_tr)
    else:
        clf = RandomForestClassifier(n_estimators=cfg.rf_trees, random_state=cfg.seed, n_jobs=1).fit(A_tr, y_tr)
    return clf.predict_proba(A_te)[:, 1].astype(float)


def _gru_fold(k: int, A_tr: np.ndarray, y_tr: np.ndarray, A_te: np.ndarray, X_te: pd.DataFrame, ids_te: np.ndarray,
              pipe: Any, cfg: ClinicalConfig, n_total: int, acc: _OutOfFold, info: dict) -> np.ndarray:
    """Train fold ``k``'s GRU, explain its share of the test rows with SHAP, return the test-row probabilities."""
    seed = cfg.seed * 1000 + k
    gru, info["gru"] = train_gru(A_tr, y_tr, cfg, seed)
    acc.n_params = sum(p.numel() for p in gru.parameters())
    proba = gru_proba([gru], A_te)
    if cfg.shap:
        t_shap = time.perf_counter()
        take = rows_to_explain(ids_te, cfg, n_total, seed)
        vals, base = explain_fold(gru, A_tr, A_te[take], cfg, seed)
        index = pd.Index(ids_te[take], name="id")
        part = pd.DataFrame(vals, columns=acc.features, index=index)
        part.insert(0, "base_value", base)
        part.insert(0, "fold", k)
        acc.shap_parts.append(part)
        acc.display_parts.append(pd.DataFrame(pipe.named_steps["encode"].transform(X_te.iloc[take]),
                                              columns=acc.features, index=index))
        info["shap_s"] = time.perf_counter() - t_shap
    return proba


def _run_fold(k: int, tr: np.ndarray, te: np.ndarray, data: ClinicalData, cfg: ClinicalConfig, acc: _OutOfFold,
              log: Any) -> None:
    """Fit the preprocessing and every model on fold ``k``'s training rows; predict its test rows into ``acc``."""
    ids = data.X.index.to_numpy()
    X_tr, X_te, y_tr, y_te = data.X.iloc[tr], data.X.iloc[te], data.y[tr], data.y[te]
    pipe = build_preprocessor(data.X, data.levels).fit(X_tr, y_tr)  # training rows only
    A_tr, A_te = pipe.transform(X_tr), pipe.transform(X_te)
    acc.features = feature_names(pipe)
    info: dict = {"fold": k, "n_train": len(tr), "n_test": len(te),
                  "train_positive": int(y_tr.sum()), "test_positive": int(y_te.sum())}
    parts = []
    for m in cfg.models:
        t0 = time.perf_counter()
        if m == "gru":
            proba = _gru_fold(k, A_tr, y_tr, A_te, X_te, ids[te], pipe, cfg, len(ids), acc, info)
        else:
            proba = _baseline_proba(m, A_tr, y_tr, A_te, cfg)
        info[f"{m}_s"] = time.perf_counter() - t0 - (info.get("shap_s", 0.0) if m == "gru" else 0.0)
        y_pred = (proba >= cfg.threshold).astype(int)
        acc.rows.append(pd.DataFrame({"id": ids[te], "fold": k, "model": m, "y_true": y_te,
                                      "y_prob": proba, "y_pred": y_pred}))
        extra = (f" ({info['gru']['best_epoch']}/{info['gru']['epochs_run']} ep)" if m == "gru" else "")
        parts.append(f"{m} acc {float(np.mean(y_pred == y_te)):.3f}{extra}")
    acc.fold_info.append(info)
    log.info("fold %d/%d: train %d (%d pos) test %d (%d pos) | %s", k + 1, cfg.folds, len(tr), int(y_tr.sum()),
             len(te), int(y_te.sum()), " | ".join(parts))


def _metadata(data: ClinicalData, cfg: ClinicalConfig, acc: _OutOfFold, summary: dict) -> dict:
    """The body of ``metrics.json``: data, settings, per-model metrics and per-fold facts."""
    n_pos = int(data.y.sum())
    meta: dict = {
        "data": {"file": str(data.source), "sha256": fsutil.sha256_file(data.source), "kind": data.kind,
                 "target": data.target, "positive_class": data.class_names[1], "negative_class": data.class_names[0],
                 "n_rows": int(len(data.y)), "n_positive": n_pos, "n_negative": int(len(data.y) - n_pos),
                 "n_features": len(acc.features)},
        "seed": cfg.seed, "folds": cfg.folds, "threshold": cfg.threshold, "feature_names": acc.features,
        "metric_notes": ("sklearn.metrics; positive class = label 1; y_pred = y_prob >= threshold; sd over folds "
                         "with ddof=1; pooled = all out-of-fold predictions together"),
        "models": {m: {"label": MODEL_LABELS[m], **summary[m]} for m in cfg.models},
        "fold_info": acc.fold_info,
        "config": to_dict(cfg),
    }
    if "gru" in cfg.models:
        meta["models"]["gru"]["n_params"] = int(acc.n_params)
    return meta


def _log_data(data: ClinicalData, cfg: ClinicalConfig, log: Any) -> None:
    n_pos, n_neg = int(data.y.sum()), int(len(data.y) - data.y.sum())
    log.info("data %s (%s): %d rows, %d features; %s %d / %s %d%s", data.source, data.kind, len(data.y),
             data.X.shape[1], data.class_names[1], n_pos, data.class_names[0], n_neg,
             f"; {data.n_unlabelled} unlabelled left out" if data.n_unlabelled else "")
    log.info("stratified %d-fold CV, seed %d, models: %s", cfg.folds, cfg.seed, ", ".join(cfg.models))


def _log_results(summary: dict, cfg: ClinicalConfig, log: Any) -> None:
    for m in cfg.models:
        p, s = summary[m]["pooled"], summary[m]
        log.info("%-20s pooled acc %.4f kappa %.4f AUC %.4f | mean acc %.4f ± %.4f kappa %.4f ± %.4f",
                 MODEL_LABELS[m], p["accuracy"], p["kappa"], p["auc"] or math.nan, s["mean"]["accuracy"],
                 s["sd"]["accuracy"], s["mean"]["kappa"], s["sd"]["kappa"])


def run(cfg: ClinicalConfig, data_path: Path, out: Path, log: Any) -> dict:
    """Run the whole experiment described in the module docstring on ``data_path`` into ``out``.

    Returns:
        the metrics dict written to ``metrics.json``.

    Raises:
        ClinicalTableError: the data file cannot be used (see :func:`load_data`).
    """
    import torch
    from sklearn.model_selection import StratifiedKFold
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_data(data_path, cfg.target, cfg.folds)
    _log_data(data, cfg, log)
    splits = list(StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed).split(data.X, data.y))
    acc = _OutOfFold()
    for k, (tr, te) in enumerate(tqdm(splits, desc="folds", unit="fold", disable=not sys.stderr.isatty(),
                                      leave=False)):
        _run_fold(k, tr, te, data, cfg, acc, log)

    pred = pd.concat(acc.rows, ignore_index=True)
    pred = pred.sort_values(["model", "id"], key=lambda s: s.map(cfg.models.index) if s.name == "model" else s,
                            kind="stable").reset_index(drop=True)
    fsutil.write_text(out / "predictions.csv", pred.to_csv(index=False))
    # metrics are computed from the CSV as written, so that anyone recomputing them gets equal numbers
    pred_rt = pd.read_csv(out / "predictions.csv")
    summary = summarise(pred_rt)
    plot_confusion_roc(pred_rt, cfg.models, data.class_names, out)
    meta = _metadata(data, cfg, acc, summary)
    if acc.shap_parts:
        shap_df = pd.concat(acc.shap_parts).sort_index()
        meta["shap"] = write_shap(shap_df, pd.concat(acc.display_parts), acc.features,
                                   pred_rt[pred_rt.model == "gru"], cfg, data.source, out, log)
    meta["wall_s"] = time.perf_counter() - t_start
    fsutil.write_json(out / "metrics.json", meta)
    fsutil.write_text(out / "metrics.md", metrics_md(meta["models"], meta))
    _log_results(summary, cfg, log)
    log.info("wrote %s (%.1f s)", out, meta["wall_s"])
    return meta
