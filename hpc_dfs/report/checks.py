"""The warnings box's checks: missed tumours, low Dice, thin validation, AUCs indistinguishable from chance."""
from __future__ import annotations

from hpc_dfs.report.html import num
from hpc_dfs.report.stats import auc_ci_hanley, finite, val_risk_counts

__all__ = ["TUMOR_DICE_WARN", "MIN_VAL_CASES", "detection_warnings", "evaluation_warnings", "training_warnings",
           "clinical_warnings"]


#: thresholds of the warnings box
TUMOR_DICE_WARN = 0.2


MIN_VAL_CASES = 10


def detection_warnings(evaluation: dict | None) -> list[str]:
    """One line per ground-truth tumour missed or found in the wrong kidney (missing predictions included)."""
    out = []
    ev = evaluation or {}
    rows = ev.get("cases", []) + ev.get("missing_cases", [])
    if rows and not any("tumors" in c for c in rows):
        return [f"{ev.get('pred_dir', 'this evaluation')}: eval.json has no tumour-detection columns (an older "
                "`hpc-dfs evaluate`); rerun evaluate to see which tumours were missed"]
    for c in rows:
        for t in c.get("tumors") or []:
            if t.get("status") == "missed":
                out.append(f"{c['case_id']}: tumour of {num(t.get('ml'), 'ml')} ml ({t.get('side')} kidney) missed"
                           + (" (no prediction)" if c.get("status") == "missing prediction" else ""))
            elif t.get("status") == "wrong kidney":
                out.append(f"{c['case_id']}: tumour of {num(t.get('ml'), 'ml')} ml ({t.get('side')} kidney) not "
                           f"found; the predicted tumour lies in the other kidney")
    return out


def evaluation_warnings(evaluation: dict | None) -> list[str]:
    """Tumour Dice below the threshold, missing predictions, failed cases, tolerances below the voxel size."""
    if not evaluation:
        return []
    out = []
    m = evaluation.get("mean_all") if (evaluation.get("mean_all") or {}).get("n_missing") else evaluation.get("mean")
    m = m or {}
    td = m.get("tumor_dice")
    if finite(td) and td < TUMOR_DICE_WARN:
        low = [c["case_id"] for c in evaluation.get("cases", []) + evaluation.get("missing_cases", [])
               if finite(c.get("tumor_dice")) and c["tumor_dice"] < TUMOR_DICE_WARN]
        out.append(f"mean tumour Dice {num(td)} is below {TUMOR_DICE_WARN} (n={m.get('n_cases')}); "
                   f"cases below it: {', '.join(low) or 'none evaluated'}")
    if evaluation.get("missing_predictions"):
        out.append(f"{len(evaluation['missing_predictions'])} ground-truth case(s) without a prediction, scored as "
                   f"Dice 0: {', '.join(evaluation['missing_predictions'])}")
    if evaluation.get("errors"):
        out.append(f"{len(evaluation['errors'])} prediction(s) could not be evaluated: "
                   + "; ".join(f"{e['case_id']}: {e['error']}" for e in evaluation["errors"]))
    tol = evaluation.get("tolerances_mm") or {}
    spacings = [c["spacing_mm"] for c in evaluation.get("cases", []) if c.get("spacing_mm")]
    if tol and spacings:
        smin, smax = min(min(s) for s in spacings), max(max(s) for s in spacings)
        below = {k: v for k, v in tol.items() if v < smax}
        if below:
            out.append("surface-Dice tolerances (" + ", ".join(f"{k} {v:.2f} mm" for k, v in below.items())
                       + f") are below the voxel size ({smin:.2f}-{smax:.2f} mm): a one-voxel boundary error already "
                         "fails them, so surface Dice here says little")
    return out


def training_warnings(ctx: dict) -> list[str]:
    """Validation over few cases, a risk AUC indistinguishable from chance, best epoch not the last."""
    out = []
    vm = ((ctx["last"] or ctx["best"] or {}).get("metrics")) or {}
    n_val = vm.get("n_val_cases")
    if isinstance(n_val, int) and n_val < MIN_VAL_CASES:
        out.append(f"validation metrics are over {n_val} case(s) (fewer than {MIN_VAL_CASES}): the validation Dice "
                   "and risk values are anecdotes, not estimates")
    counts = val_risk_counts(ctx["manifest"], ctx["cfg"])
    auc = vm.get("risk_auc")
    if finite(auc) and counts and min(counts) > 0:
        lo, hi = auc_ci_hanley(float(auc), *counts)
        if lo <= 0.5 <= hi:
            out.append(f"validation risk AUC {num(auc)} (95 % CI {lo:.2f}-{hi:.2f}, {counts[0]} malignant / "
                       f"{counts[1]} benign) is not distinguishable from chance (0.5)")
    elif vm.get("risk_acc") is not None and not finite(auc):
        out.append("validation risk AUC is undefined (the validation cases have one class"
                   + (f": {counts[0]} malignant / {counts[1]} benign" if counts else "") + "); risk accuracy "
                   f"{num(vm.get('risk_acc'))} is then what a majority-class predictor gets")
    n_ep, b_ep = ctx["epochs"], ctx["best_epoch"]
    if isinstance(n_ep, int) and isinstance(b_ep, int) and n_ep != b_ep:
        out.append(f"best epoch {b_ep} differs from the last epoch trained ({n_ep}): best.pt (used by predict when "
                   "passed) is not the final model")
    return out


def clinical_warnings(stats: dict, positive: str) -> list[str]:
    """Warnings for clinical AUCs whose interval contains 0.5, and for SHAP of such a GRU."""
    out = [f"clinical {s['label']}: AUC {s['auc']:.2f} for {positive} (95 % CI {s['ci'][0]:.2f}-{s['ci'][1]:.2f}, "
           f"n={s['n']}) is not distinguishable from chance (0.5)" for s in stats.values() if s["chance"]]
    gru = stats.get("gru")
    if gru and gru["chance"]:
        out.append("the SHAP pictures explain the Clinical-GRU, a model no better than chance here: they describe "
                   "what that model does, not what predicts malignancy")
    return out
