"""Clinical-GRU k-fold experiment: the paper's GRU next to sklearn baselines, with SHAP.

``hpc-dfs clinical --data FILE --folds K --seed S --out DIR`` runs stratified K-fold
cross-validation of three models on the same folds:

- ``gru``: the paper's 3,393-parameter Clinical-GRU (:class:`hpc_dfs.models.ClinicalGRU`), which
  reads the F features of a patient as a sequence of F scalars;
- ``logistic_regression`` and ``random_forest`` (500 trees), the usual strong baselines.

Data: UCI Chronic Kidney Disease (``.arff`` or ``.csv``, read by :mod:`hpc_dfs.data.uci_ckd`;
target ``ckd``), or a KiTS ``kits.json`` with ``--target malignant`` (pre-operative features only,
from :mod:`hpc_dfs.data.kits_clinical`; cases without a label are left out).

No leakage: the preprocessing (imputation, encoding, scaling, risk orientation) is one sklearn
``Pipeline`` fitted inside each fold on that fold's training rows only; the GRU's early stopping
uses an inner stratified split of the training rows; the test rows are touched only to predict.

**Why the GRU needs a recipe.** The GRU shares one input weight across all F steps, so it cannot
tell from a single weight that a *high* haemoglobin is good while a *high* creatinine is bad; it
must learn the position of each feature in its hidden state, and on 320 training rows it underfits
(plain Adam on standardised, one-hot inputs: accuracy 0.87 +- 0.04). The recipe used here:

1. ordinal coding of sg/al/su and 0/1 coding of the binary columns (24 steps on UCI CKD);
2. median/most-frequent imputation and standardisation (training rows only);
3. *risk orientation*: each standardised feature is multiplied by the sign of the difference
   of its class means on the training rows, so that for every step "larger = more risk"
   (:class:`RiskOrientation`; a sign flip, hence no information added or removed);
4. full-batch AdamW, linear warm-up then cosine learning-rate decay, gradient clipping at 1,
   class-balanced BCE, early stopping on the inner validation loss, best weights restored.

Measured on UCI CKD, 5 folds, pooled out-of-fold: steps 1, 2 and 4 alone give an accuracy of
0.955-0.97 (seeds 0-2); with step 3 the GRU reaches 0.985-0.9925, mean 0.990, and kappa
0.968-0.984, mean 0.979 (seeds 0-4), next to logistic regression at 0.995-0.9975.

Outputs in ``--out`` (every file written atomically):

- ``predictions.csv``: ``id, fold, model, y_true, y_prob, y_pred``, one row per sample per model;
- ``metrics.json``: per model FPR, FNR, sensitivity, specificity, accuracy, F-score, Cohen's kappa
  and ROC AUC (sklearn.metrics) per fold, as mean and sd over folds, and pooled out of fold; the
  GRU's parameter count; data file, seed, folds, feature names and the resolved settings;
- ``metrics.md``: the same as a table; ``confusion_matrices.png``, ``roc.png``;
- SHAP of the GRU (``shap.KernelExplainer`` in log-odds of the positive class; each patient is
  explained by the fold model that did not see it; ``--shap-rows`` patients): ``shap_bar.png``,
  ``shap_beeswarm.png``, ``shap_importance.json`` (features by mean |SHAP|), ``shap_values.csv``,
  and one patient's explanation as ``shap_patient_<id>.png`` (waterfall) and ``shap_patient.json``.

Example::

    hpc-dfs clinical --data ../shared/data/uci_ckd/chronic_kidney_disease_full.arff \\
        --folds 5 --seed 0 --out runs/clinical
    hpc-dfs clinical --data data/kits/kits.json --target malignant --folds 5 --out runs/clinical_kits
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

from hpc_dfs import fsutil
from hpc_dfs.config import ConfigError, add_arguments as _add_config_arguments, from_args, require_path, to_dict
from hpc_dfs.config.clinical import ClinicalConfig
from hpc_dfs.errors import EXIT_USAGE, HpcDfsError
from hpc_dfs.log import get_logger

__all__ = ["ClinicalTableError", "ClinicalData", "load_data", "build_preprocessor", "RiskOrientation",
           "train_gru", "binary_metrics", "summarise", "run", "add_arguments", "main"]

CLI_LONG_HELP = True
MODEL_LABELS = {"gru": "Clinical-GRU", "logistic_regression": "logistic regression",
                "random_forest": "random forest"}
METRICS = ("accuracy", "kappa", "auc", "sensitivity", "specificity", "f1", "fpr", "fnr")
_UCI_TARGETS = ("auto", "ckd", "class", "classification")


class ClinicalTableError(HpcDfsError, ValueError):
    """The data file cannot be used; the message names the file and the problem (exit code 2, as ever)."""

    code = EXIT_USAGE


# ----------------------------------------------------------------------------- data
@dataclass
class ClinicalData:
    """Features, 0/1 labels and what they are.

    Attributes:
        X: feature frame indexed by sample id (numeric columns float, nominal columns object).
        y: int array of 0/1 labels aligned with ``X``.
        levels: binary nominal columns -> (reference level, risk level), coded 0/1.
        source: the data file; kind: ``"uci_ckd"`` or ``"kits"``; target: target name;
        class_names: names of label 0 and label 1; n_unlabelled: rows left out for lack of a label.
    """

    X: pd.DataFrame
    y: np.ndarray
    levels: dict
    source: Path
    kind: str
    target: str
    class_names: tuple[str, str]
    n_unlabelled: int = 0


def load_data(path: str | Path, target: str = "auto", folds: int = 2) -> ClinicalData:
    """Load UCI CKD (``.arff``/``.csv``) or KiTS records (``.json``, or a clinical CSV with a
    non-UCI ``target``) and check that stratified ``folds``-fold CV is possible.

    Raises:
        ClinicalTableError: missing file, unknown format, no target column, or a class with fewer
            rows than folds. One message naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ClinicalTableError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".arff", ".csv") and target in _UCI_TARGETS:
        from hpc_dfs.data.uci_ckd import FEATURES, NOMINAL_LEVELS, TARGET, UCICKDError, load_uci_ckd
        try:
            frame = load_uci_ckd(path)
        except UCICKDError as e:
            raise ClinicalTableError(str(e)) from None
        data = ClinicalData(X=frame[list(FEATURES)], y=frame[TARGET].to_numpy(dtype=int),
                            levels=dict(NOMINAL_LEVELS), source=path, kind="uci_ckd", target=TARGET,
                            class_names=("notckd", "ckd"))
    elif suffix == ".json" or (suffix == ".csv" and target not in _UCI_TARGETS):
        from hpc_dfs.data.kits_clinical import ClinicalRecordError, load_kits_records, preop_frame, risk_labels
        tgt = "malignant" if target == "auto" else target
        if suffix == ".csv":
            _require_csv_column(path, tgt)
        try:
            records = load_kits_records(path)
            X = preop_frame(records, target=tgt)
            labels = risk_labels(records, target=tgt)
        except (ClinicalRecordError, ValueError, FileNotFoundError) as e:
            raise ClinicalTableError(f"{path}: {e}") from None
        if labels.notna().sum() == 0:
            raise ClinicalTableError(f"{path}: no target column '{tgt}' (no record has a 0/1 value for it)")
        known = labels.notna().to_numpy()
        X, labels = X.loc[known], labels[known]
        data = ClinicalData(X=X, y=labels.to_numpy(dtype=int), levels={}, source=path, kind="kits",
                            target=tgt, class_names=(f"not {tgt}", tgt), n_unlabelled=int((~known).sum()))
    else:
        raise ClinicalTableError(
            f"{path}: unknown format {suffix or '(no suffix)'!r} for target {target!r}; expected a UCI CKD "
            ".arff/.csv (target auto/ckd) or a KiTS kits.json (--target malignant)")
    counts = np.bincount(data.y, minlength=2)
    for label, n in enumerate(counts):
        if n < folds:
            raise ClinicalTableError(
                f"{path}: class '{data.class_names[label]}' has only {n} rows, fewer than --folds {folds}; "
                "stratified cross-validation needs at least one row of each class per fold")
    return data


def _require_csv_column(path: Path, target: str) -> None:
    """A clinical CSV must hold the ``target`` column (flattened name, e.g. ``malignant``) before anything else.

    Raises:
        ClinicalTableError: the header cannot be read, or it has no ``target`` column; names the file and target.
    """
    try:
        columns = [c.strip() for c in pd.read_csv(path, dtype=str, nrows=0).columns]
    except (ValueError, OSError) as e:
        raise ClinicalTableError(f"{path}: cannot read the CSV header: {e}") from None
    if target not in columns:
        shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
        raise ClinicalTableError(f"{path}: no target column '{target}' (the CSV has {len(columns)} columns: {shown}); "
                                "UCI CKD takes --target auto/ckd, a KiTS table a 0/1 column such as malignant")


# ----------------------------------------------------------------------------- preprocessing
class RiskOrientation(TransformerMixin, BaseEstimator):
    """Multiply each column by the sign of (mean over label 1) - (mean over label 0).

    Hand-written because sklearn has no such step. Fitted on training rows (it needs ``y``), it
    makes every feature point the same way ("larger = closer to label 1"), which a sequence model
    with one shared input weight, like the Clinical-GRU, cannot learn per position on its own.
    A pure sign flip: logistic regression and random forests are unaffected by it.
    """

    def fit(self, X: Any, y: Any) -> "RiskOrientation":
        X = np.asarray(X, dtype=float)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X) or not ((y == 0).any() and (y == 1).any()):
            raise ValueError("RiskOrientation.fit needs 0/1 labels of both classes, one per row")
        diff = X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0)
        self.sign_ = np.where(diff < 0, -1.0, 1.0)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X: Any) -> np.ndarray:
        return np.asarray(X, dtype=float) * self.sign_

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray(input_features, dtype=object)


def build_preprocessor(X: pd.DataFrame, levels: dict) -> Any:
    """The per-fold feature pipeline: encode+impute (column order kept) -> scale -> orient.

    Columns in ``levels`` are imputed with the most frequent level and coded 0/1 (risk level = 1);
    numeric columns are median-imputed; other object columns are one-hot encoded. Fit it with
    ``pipe.fit(X_train, y_train)`` on the training rows of a fold only.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    parts = []
    for col in X.columns:
        if col in levels:
            enc = make_pipeline(SimpleImputer(strategy="most_frequent"),
                                OrdinalEncoder(categories=[list(levels[col])]))
        elif pd.api.types.is_numeric_dtype(X[col]):
            enc = SimpleImputer(strategy="median", keep_empty_features=True)
        else:
            enc = make_pipeline(SimpleImputer(strategy="most_frequent", keep_empty_features=True),
                                OneHotEncoder(handle_unknown="ignore", sparse_output=False))
        parts.append((col, enc, [col]))
    encode = ColumnTransformer(parts, verbose_feature_names_out=False)
    return Pipeline([("encode", encode), ("scale", StandardScaler()), ("orient", RiskOrientation())])


def _feature_names(pipe: Any) -> list[str]:
    names = []
    for name, trans, cols in pipe.named_steps["encode"].transformers_:
        if name == "remainder":
            continue
        out = list(trans.get_feature_names_out(cols)) if hasattr(trans, "get_feature_names_out") else list(cols)
        names += [str(n) for n in out]
    return names


# ----------------------------------------------------------------------------- GRU training
def _early_stopping_split(X: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> tuple:
    """``(X_fit, y_fit, X_val, y_val)``: a stratified inner split, or all rows and no validation when a class
    is too small for it."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y, minlength=2)
    n_val = int(round(val_fraction * len(y)))
    if not (counts.min() >= 2 and min(counts) * val_fraction >= 1 and n_val >= 2):
        return X, y, None, None
    X_fit, X_val, y_fit, y_val = train_test_split(X, y, test_size=val_fraction, stratify=y, random_state=seed)
    return X_fit, y_fit, X_val, y_val


def _class_weights(yf: Any, balanced: bool) -> Any:
    """Per-row loss weights: with ``balanced`` each class contributes half of the loss, else all ones."""
    import torch

    n_pos = float(yf.sum())
    n_neg = float(len(yf) - n_pos)
    if balanced and n_pos > 0 and n_neg > 0:
        return torch.where(yf > 0, len(yf) / (2 * n_pos), len(yf) / (2 * n_neg))
    return torch.ones_like(yf)


def train_gru(X: np.ndarray, y: np.ndarray, cfg: ClinicalConfig, seed: int) -> tuple[Any, dict]:
    """Train one Clinical-GRU on preprocessed training rows with the stable recipe.

    An inner stratified split (``cfg.val_fraction``) provides the early-stopping loss; the weights
    of the best inner-validation epoch are returned. When a class is too small for the inner split,
    training runs all ``cfg.epochs`` on all rows (and says so in the returned info).

    Returns:
        ``(model in eval mode, info)`` with ``epochs_run``, ``best_epoch``, ``best_val_loss``,
        ``train_s`` and ``early_stopping``.
    """
    import torch
    import torch.nn.functional as F

    from hpc_dfs.models import ClinicalGRU

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    X_fit, y_fit, X_val, y_val = _early_stopping_split(X, y, cfg.val_fraction, seed)
    early = X_val is not None
    xf = torch.as_tensor(X_fit, dtype=torch.float32)
    yf = torch.as_tensor(y_fit, dtype=torch.float32)
    w = _class_weights(yf, cfg.balanced)

    model = ClinicalGRU(X.shape[1], hidden=cfg.hidden, dropout=cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.warmup_epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: min(1.0, (e + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(e, cfg.epochs) / cfg.epochs)))
    batch = cfg.batch_size or len(yf)
    best_loss, best_state, best_epoch, bad, epoch = math.inf, None, -1, 0, -1
    if early:
        xv = torch.as_tensor(X_val, dtype=torch.float32)
        yv = torch.as_tensor(y_val, dtype=torch.float32)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(yf), generator=gen)
        for i in range(0, len(yf), batch):
            idx = order[i:i + batch]
            loss = F.binary_cross_entropy_with_logits(model(xf[idx]), yf[idx], weight=w[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        sched.step()
        if not early:
            continue
        model.eval()
        with torch.no_grad():
            val_loss = F.binary_cross_entropy_with_logits(model(xv), yv).item()
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, bad = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    info = {"epochs_run": epoch + 1, "best_epoch": best_epoch + 1 if early else epoch + 1,
            "best_val_loss": best_loss if early else None, "early_stopping": early,
            "train_s": time.perf_counter() - t0}
    return model, info


def _gru_proba(models: list, X: np.ndarray) -> np.ndarray:
    import torch

    x = torch.as_tensor(X, dtype=torch.float32)
    return np.mean([m.predict_proba(x).double().numpy() for m in models], axis=0)


# ----------------------------------------------------------------------------- metrics
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


# ----------------------------------------------------------------------------- plots
def _save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with fsutil.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_confusion_roc(pred: pd.DataFrame, models: list[str], class_names: tuple[str, str], out: Path) -> None:
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


# ----------------------------------------------------------------------------- SHAP
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


def _rows_to_explain(ids_test: np.ndarray, cfg: ClinicalConfig, n_total: int, seed: int) -> np.ndarray:
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


def _write_shap(shap_df: pd.DataFrame, display: pd.DataFrame, features: list[str], pred_gru: pd.DataFrame,
                cfg: ClinicalConfig, source: Path, out: Path, log: Any) -> dict:
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


# ----------------------------------------------------------------------------- reports
def _fmt(v: Any, nd: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _metrics_md(summary: dict, meta: dict) -> str:
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


# ----------------------------------------------------------------------------- the experiment
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
    proba = _gru_proba([gru], A_te)
    if cfg.shap:
        t_shap = time.perf_counter()
        take = _rows_to_explain(ids_te, cfg, n_total, seed)
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
    acc.features = _feature_names(pipe)
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
    _plot_confusion_roc(pred_rt, cfg.models, data.class_names, out)
    meta = _metadata(data, cfg, acc, summary)
    if acc.shap_parts:
        shap_df = pd.concat(acc.shap_parts).sort_index()
        meta["shap"] = _write_shap(shap_df, pd.concat(acc.display_parts), acc.features,
                                   pred_rt[pred_rt.model == "gru"], cfg, data.source, out, log)
    meta["wall_s"] = time.perf_counter() - t_start
    fsutil.write_json(out / "metrics.json", meta)
    fsutil.write_text(out / "metrics.md", _metrics_md(meta["models"], meta))
    _log_results(summary, cfg, log)
    log.info("wrote %s (%.1f s)", out, meta["wall_s"])
    return meta


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hpc-dfs clinical`` options: ``--data`` and ``--out``, then every :class:`ClinicalConfig` field as a flag."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("example:\n  hpc-dfs clinical --data ../shared/data/uci_ckd/chronic_kidney_disease_full.arff "
                     "--folds 5 --seed 0 --out runs/clinical\n"
                     "  hpc-dfs clinical --data data/kits/kits.json --target malignant --out runs/clinical_kits")
    parser.add_argument("--data", type=Path, default=None, metavar="FILE",
                        help="UCI CKD .arff/.csv, or a KiTS kits.json (with --target malignant)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="output directory (created)")
    _add_config_arguments(parser, ClinicalConfig)


def main(args: argparse.Namespace) -> int:
    """Run the experiment.

    Raises:
        ConfigError: a bad setting, or ``--data``/``--out`` missing or ``--data`` not a file (exit code 2).
        ClinicalTableError: the data file cannot be used (exit code 2).
    """
    import matplotlib

    matplotlib.use("Agg")
    cfg = from_args(ClinicalConfig, args)
    if args.data is None:
        raise ConfigError("--data is required (a UCI CKD .arff/.csv or a KiTS kits.json)")
    if args.out is None:
        raise ConfigError("--out is required (the output directory)")
    run(cfg, require_path(args.data, "file", "--data"), args.out, get_logger("hpc_dfs.clinical"))
    return 0
