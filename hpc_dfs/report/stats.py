"""Statistics behind the warnings: AUC confidence intervals (Hanley-McNeil, bootstrap) and class counts."""
from __future__ import annotations

import math

import numpy as np

from hpc_dfs.visualize import is_finite_number as finite

__all__ = ["finite", "auc_ci_hanley", "auc_ci_bootstrap", "val_risk_counts", "clinical_stats"]


def auc_ci_hanley(auc: float, n_pos: int, n_neg: int, z: float = 1.96) -> tuple[float, float]:
    """95 % confidence interval of a ROC AUC from the class sizes (Hanley & McNeil 1982), clipped to [0, 1]."""
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc ** 2) + (n_neg - 1) * (q2 - auc ** 2)) / max(n_pos * n_neg, 1)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def auc_ci_bootstrap(y: np.ndarray, p: np.ndarray, n_boot: int = 500, seed: int = 0) -> tuple[float, float] | None:
    """95 % percentile-bootstrap interval of the ROC AUC over cases (None when a class is absent)."""
    from sklearn.metrics import roc_auc_score
    y, p = np.asarray(y), np.asarray(p)
    if len(set(y.tolist())) < 2:
        return None
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(set(y[idx].tolist())) == 2:
            aucs.append(roc_auc_score(y[idx], p[idx]))
    return (float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))) if aucs else None


def val_risk_counts(manifest: dict | None, cfg) -> tuple[int, int] | None:
    """(malignant, benign) validation cases from the manifest's fold of the run (None when unknown)."""
    if not manifest or cfg is None:
        return None
    labels = [c.get("risk_label") for c in manifest.get("cases", []) if c.get("fold") == cfg.schedule.val_fold]
    return sum(lab == 1 for lab in labels), sum(lab == 0 for lab in labels)


def clinical_stats(oof: dict, labels: dict) -> dict[str, dict]:
    """Per model: AUC, its bootstrap 95 % CI and whether the CI contains 0.5."""
    from sklearn.metrics import roc_auc_score
    out = {}
    for m, (y, p) in oof.items():
        if len(set(y.tolist())) < 2:
            continue
        ci = auc_ci_bootstrap(y, p)
        out[m] = {"label": labels.get(m, m), "auc": float(roc_auc_score(y, p)), "ci": ci, "n": len(y),
                  "chance": ci is not None and ci[0] <= 0.5 <= ci[1]}
    return out
