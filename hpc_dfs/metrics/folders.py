"""A prediction folder against a ground-truth folder: pairs by KiTS naming, the predictions' provenance, and the
folds of an out-of-fold prediction (``predict --oof``)."""
from __future__ import annotations

from pathlib import Path

from hpc_dfs.contracts.kits import EVAL_LABEL_FILES, find_label_file
from hpc_dfs.contracts.prediction import SUMMARY_NAME, case_id_of, read_summary
from hpc_dfs.errors import EXIT_DATA
from hpc_dfs.metrics.cases import EvaluationError, summarise

__all__ = ["match_predictions", "check_provenance", "fold_figures", "FOLD_KEYS"]


def match_predictions(pred_dir: Path, gt_dir: Path) -> tuple[list[tuple[str, Path, Path | None]], list[str]]:
    """Pair ``prediction_XXXXX.nii.gz`` (or ``case_XXXXX.nii.gz``) files with ``case_XXXXX`` ground truth.

    Returns:
        ``[(case_id, pred_path, gt_path or None)]`` sorted by case id, and the ground-truth case ids
        that have no prediction.

    Raises:
        EvaluationError: a folder is missing, holds no prediction, or holds one case under both names (which
            of the two to score cannot be told).
    """
    if not pred_dir.is_dir():
        raise EvaluationError(f"prediction directory {pred_dir} does not exist")
    if not gt_dir.is_dir():
        raise EvaluationError(f"ground-truth directory {gt_dir} does not exist")
    pairs, seen = [], {}
    for p in sorted(pred_dir.iterdir()):
        cid = case_id_of(p.name)
        if cid is not None and p.is_file():
            if cid in seen:
                raise EvaluationError(f"{pred_dir} holds {cid} twice, as {seen[cid]} and {p.name}: remove one of "
                                      "them (which of the two to score cannot be told)", code=EXIT_DATA)
            seen[cid] = p.name
            pairs.append((cid, p, find_label_file(gt_dir / cid, EVAL_LABEL_FILES)))
    if not pairs:
        raise EvaluationError(f"{pred_dir} holds no prediction_XXXXX.nii.gz (or case_XXXXX.nii.gz) files")
    predicted = {c for c, _, _ in pairs}
    gt_cases = sorted(d.name for d in gt_dir.glob("case_*") if d.is_dir() and find_label_file(d, EVAL_LABEL_FILES))
    return pairs, [c for c in gt_cases if c not in predicted]


def _header_descrip(path: Path) -> str | None:
    """The NIfTI header's ``descrip`` (predict writes its provenance there), or None when unreadable."""
    import nibabel as nib
    try:
        return bytes(nib.load(str(path)).header["descrip"].item()).decode("ascii", "replace").rstrip("\x00")
    except Exception:  # noqa: BLE001 - a damaged file is reported when the case is evaluated
        return None


def check_provenance(pred_dir: Path, pairs: list[tuple[str, Path, Path | None]]) -> None:
    """Every prediction must come from the one run that ``pred_dir/summary.json`` describes.

    A prediction is refused when its case is not an ``ok`` row of the summary (a stale file of another run, kept
    beside a run where the case failed), or when its header's ``descrip`` (``hpc-dfs <checkpoints sha>
    <input sha>``) differs from the row's. Folders without a summary, or summaries written before predict
    recorded provenance, are not checked.

    Raises:
        EvaluationError: the summary cannot be read, or some predictions are not from its run; names them.
    """
    path = pred_dir / SUMMARY_NAME
    try:
        summary = read_summary(pred_dir)
        if summary is None:
            return
        rows = {r.get("case_id"): r for r in summary.get("cases", []) if isinstance(r, dict)}
    except (OSError, ValueError, AttributeError) as e:
        raise EvaluationError(f"{path}: cannot be read ({e})", code=EXIT_DATA) from None
    if not any("provenance" in r for r in rows.values()):
        return
    bad = []
    for cid, pred, _ in pairs:
        row = rows.get(cid)
        if row is None or row.get("status") != "ok":
            bad.append(f"{pred.name} ({cid} {'is not in it' if row is None else 'failed in it'})")
            continue
        want, got = (row.get("provenance") or {}).get("descrip"), _header_descrip(pred)
        if want and got is not None and got != want:
            bad.append(f"{pred.name} (its header says {got!r}, the summary {want!r})")
    if bad:
        raise EvaluationError(f"{len(bad)} prediction(s) in {pred_dir} are not from the run of {path.name} "
                              f"(provenance: another checkpoint or input): {'; '.join(bad[:4])}; remove them or "
                              "predict again", code=EXIT_DATA)


#: the per-fold figures of an out-of-fold evaluation (means over each fold's cases)
FOLD_KEYS = ("kidney_dice", "tumor_dice", "kits_score", "mean_iou", "kidney_surface_dice", "tumor_surface_dice")


def fold_figures(pred_dir: Path, cases: list[dict], missing_rows: list[dict]) -> dict | None:
    """Per-fold figures of an out-of-fold prediction (``predict --oof``: each summary row names its ``fold``).

    Each case row (and missing-prediction row) gets its ``fold``; the figures are :func:`summarise` over each fold's
    cases, and the mean and standard deviation of the folds' means (nnU-Net reports the pooled mean, the
    evaluation's ``mean``, beside them).

    Args:
        pred_dir: the prediction folder.
        cases: the evaluated case rows (changed in place: ``fold`` added).
        missing_rows: rows of ground-truth cases without a prediction (``fold`` added where the summary knows it).

    Returns:
        ``{run, per_fold: {K: mean}, fold_mean, fold_sd}``, or None when the predictions are not out-of-fold.

    Raises:
        EvaluationError: ``summary.json`` cannot be read.
    """
    try:
        summary = read_summary(pred_dir)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"{pred_dir / SUMMARY_NAME}: cannot be read ({e})", code=EXIT_DATA) from None
    if not summary or "oof" not in summary:
        return None
    folds = {r["case_id"]: r["fold"] for r in summary.get("cases", []) if isinstance(r, dict) and "fold" in r}
    for k, f in summary["oof"].get("folds", {}).items():   # the fold of a validation case that failed or is absent
        for cid in f.get("cases", []):
            folds.setdefault(cid, int(k))
    for c in cases + missing_rows:
        if c["case_id"] in folds:
            c["fold"] = folds[c["case_id"]]
    per_fold = {str(k): summarise([c for c in cases if c.get("fold") == k]) for k in sorted(set(folds.values()))}
    out = {"run": summary["oof"].get("run"), "per_fold": per_fold, "fold_mean": {}, "fold_sd": {}}
    for key in FOLD_KEYS:
        vals = [m[key] for m in per_fold.values() if m.get(key) is not None]
        if vals:
            mu = sum(vals) / len(vals)
            out["fold_mean"][key] = mu
            out["fold_sd"][key] = (sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return out
