"""The evaluation results that ``evaluate`` writes and ``report`` reads (``hpc_dfs/CONTRACTS.md`` section 5).

    EVAL/eval.json   EVAL_NAME (the default ``--out``): :class:`Evaluation` (:func:`write_outputs` /
                     :func:`read_evaluation`)
    EVAL/eval.csv    the per-case table (:func:`to_csv`): ``COLUMNS``, ``DETECTION_COLUMNS``, detection, status
    EVAL/eval.md     the same as markdown tables (:func:`to_markdown`)

The three files share the stem of ``--out``; the definitions of every column are in the JSON's ``definitions``.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional, TypedDict

import numpy as np

from hpc_dfs import fsutil

__all__ = ["EVAL_NAME", "COLUMNS", "DETECTION_COLUMNS", "Evaluation", "to_csv", "to_markdown", "write_outputs",
           "read_evaluation", "default_eval_path", "kits23_markdown", "write_kits23_outputs"]

EVAL_NAME = "eval.json"


class Evaluation(TypedDict, total=False):
    """``eval.json``: per-case rows, means over evaluated cases and over every ground-truth case, errors."""

    pred_dir: str
    gt_dir: str
    definitions: dict[str, str]
    tolerances_mm: dict[str, float]
    cases: list[dict[str, Any]]
    mean: dict[str, Any]
    missing_cases: list[dict[str, Any]]
    mean_all: dict[str, Any]
    errors: list[dict[str, str]]
    missing_predictions: list[str]
    postprocessing: dict[str, Any]
    intervals: dict[str, Any]
    regions: str            # "kits23" for the official KiTS23 evaluation (absent: KiTS19 regions)
    columns: list[str]      # kits23: the columns of the official evaluation.csv
    oof: dict[str, Any]     # predict --oof: {run, per_fold: {K: mean}, fold_mean, fold_sd}; cases carry their fold





#: Columns of the CSV and the markdown table, in order (per-case keys of the JSON).
COLUMNS = ("kidney_dice", "tumor_dice", "kits_score", "kidney_iou", "tumor_iou", "mean_iou", "kidney_hd95",
           "tumor_hd95", "kidney_surface_dice", "tumor_surface_dice", "kidney_ml_gt", "kidney_ml_pred",
           "tumor_ml_gt", "tumor_ml_pred")


#: Detection columns (integers and volumes, see the module docstring), after ``COLUMNS`` in the CSV.
DETECTION_COLUMNS = ("n_tumors_gt", "n_tumors_hit", "n_tumors_missed", "n_tumors_wrong_kidney", "n_fp_components",
                     "fp_ml")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return repr(float(v))


def to_csv(result: dict) -> str:
    """The per-case table as CSV: ``COLUMNS``, ``DETECTION_COLUMNS``, ``detection``, ``status``, then the mean."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    extra = [k for k in ("kidney_dice_raw", "tumor_dice_raw", "kits_score_raw") if any(k in c for c in result["cases"])]
    keys = (*COLUMNS, *extra, *DETECTION_COLUMNS)
    w.writerow(["case_id", *keys, "detection", "status"])
    for c in result["cases"] + result.get("missing_cases", []):
        w.writerow([c["case_id"], *(_csv_cell(c.get(k)) for k in keys), c.get("detection", ""),
                    c.get("status", "evaluated")])
    for label, m in (("mean_all", result.get("mean_all")), ("mean", result["mean"])):  # "mean" last
        if m is not None and (label == "mean" or m.get("n_missing")):
            w.writerow([label, *(_csv_cell(m.get(k)) for k in keys), "", f"n={m['n_cases']}"])
    return buf.getvalue()


MD_HEAD = ("case", "kidney Dice", "tumour Dice", "KiTS19 score", "mean IoU", "kidney HD95 (mm)", "tumour HD95 (mm)",
           "kidney SD", "tumour SD")


MD_KEYS = ("kidney_dice", "tumor_dice", "kits_score", "mean_iou", "kidney_hd95", "tumor_hd95", "kidney_surface_dice",
           "tumor_surface_dice")


DETECTION_HEAD = ("case", "tumour ml (truth)", "tumour ml (predicted)", "tumours", "hit", "missed", "wrong kidney",
                  "false-positive components", "false-positive ml", "detection")


DETECTION_KEYS = ("tumor_ml_gt", "tumor_ml_pred", "n_tumors_gt", "n_tumors_hit", "n_tumors_missed",
                  "n_tumors_wrong_kidney", "n_fp_components", "fp_ml", "detection")


def _md_metrics(result: dict) -> list[str]:
    lines = ["| " + " | ".join(MD_HEAD) + " |", "|" + "---|" * len(MD_HEAD)]
    for c in result["cases"]:
        lines.append("| " + " | ".join([c["case_id"], *(_fmt(c.get(k)) for k in MD_KEYS)]) + " |")
    for c in result.get("missing_cases", []):
        lines.append("| " + " | ".join([f"{c['case_id']} (no prediction)", *(_fmt(c.get(k)) for k in MD_KEYS)]) + " |")
    m = result["mean"]
    lines.append(f"| **mean (n={m['n_cases']})** | " + " | ".join(f"**{_fmt(m.get(k))}**" for k in MD_KEYS) + " |")
    ma = result.get("mean_all")
    if ma and ma.get("n_missing"):
        lines.append(f"| **mean, missing = 0 (n={ma['n_cases']})** | "
                     + " | ".join(f"**{_fmt(ma.get(k))}**" for k in MD_KEYS) + " |")
    return lines


def _md_detection(result: dict) -> list[str]:
    lines = ["", "## Tumour detection", "", "| " + " | ".join(DETECTION_HEAD) + " |",
             "|" + "---|" * len(DETECTION_HEAD)]
    for c in result["cases"] + result.get("missing_cases", []):
        lines.append("| " + " | ".join([c["case_id"], *(_fmt(c.get(k), 1) for k in DETECTION_KEYS)]) + " |")
    return lines


def _ci(x: dict | None, digits: int = 3) -> str:
    if not x:
        return "-"
    lo, hi = x["ci95"]
    extra = f", {x['hits']}/{x['total']} tumours" if "total" in x else ""
    return f"{x['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] (n={x['n']} cases{extra})"


def _md_intervals(result: dict) -> list[str]:
    iv = result.get("intervals")
    if not iv:
        return []
    lines = ["", "## With 95 % intervals", "", "| figure | mean [95 % interval] |", "|---|---|",
             f"| kidney Dice | {_ci(iv['kidney_dice'])} |", f"| tumour Dice | {_ci(iv['tumor_dice'])} |",
             f"| tumours detected | {_ci(iv['tumor_detection_rate'])} |"]
    lines += [f"| detected, tumours {k} | {_ci(v)} |" for k, v in iv["detection_by_size"].items()]
    for k, v in (iv.get("detection_by_contrast") or {}).items():
        lines.append(f"| detected, {k} tumours ({'<' if k == 'faint' else '>='} 1 kidney SD) | {_ci(v)} |")
    lines += ["", f"{iv['method']}. Call a difference between two evaluations only where the intervals separate."]
    tumours = [(c["case_id"], t) for c in result["cases"] for t in c.get("tumors") or []]
    if tumours:
        lines += ["", "| case | tumour ml | side | contrast (kidney SD) | detection |", "|---|---|---|---|---|"]
        for cid, t in tumours:
            con = t.get("contrast_sd")
            con = "-" if con is None else f"{con:+.2f}" + (" (faint)" if t.get("faint") else "")
            lines.append(f"| {cid} | {t['ml']:.1f} | {t['side']} | {con} | {t['status']} |")
    return lines


def _md_folds(result: dict) -> list[str]:
    """Per fold and pooled, for an out-of-fold prediction (``predict --oof``)."""
    oof = result.get("oof")
    if not oof:
        return []
    keys = ("kidney_dice", "tumor_dice", "kits_score")
    lines = ["", "## Cross-validation: per fold and pooled", "",
             f"Each case predicted by the model of its own fold (`{oof.get('run')}`); pooled = every case as one set.",
             "", "| fold | cases | kidney Dice | tumour Dice | KiTS19 score |", "|---|---|---|---|---|"]
    for k, m in oof["per_fold"].items():
        lines.append(f"| {k} | {m['n_cases']} | " + " | ".join(_fmt(m.get(x)) for x in keys) + " |")
    lines.append("| mean of folds (SD) | | " + " | ".join(
        f"{_fmt(oof['fold_mean'].get(x))} ({_fmt(oof['fold_sd'].get(x))})" for x in keys) + " |")
    lines.append(f"| **pooled** | **{result['mean']['n_cases']}** | "
                 + " | ".join(f"**{_fmt(result['mean'].get(x))}**" for x in keys) + " |")
    return lines


def to_markdown(result: dict) -> str:
    """The evaluation as markdown: metrics, tumour detection, post-processing, errors and definitions."""
    m = result["mean"]
    lines = ["# Evaluation", "",
             f"Predictions `{result['pred_dir']}` against ground truth `{result['gt_dir']}`: "
             f"{m['n_cases']} cases evaluated"
             + (f", {len(result['missing_predictions'])} without a prediction" if result.get("missing_predictions")
                else "") + ".", ""]
    lines += _md_metrics(result) + _md_folds(result) + _md_intervals(result) + _md_detection(result)
    pp = result.get("postprocessing")
    if pp:
        lines += ["", "## Effect of post-processing (mean Dice)", "", "| | kidney Dice | tumour Dice | KiTS19 score |",
                  "|---|---|---|---|"]
        for name in ("raw", "postprocessed", "delta"):
            lines.append(f"| {name} | " + " | ".join(_fmt(pp[name][k]) for k in ("kidney_dice", "tumor_dice",
                                                                                  "kits_score")) + " |")
    if result.get("errors"):
        lines += ["", "## Cases that could not be evaluated", ""] + [f"- {e['case_id']}: {e['error']}"
                                                                      for e in result["errors"]]
    if result.get("missing_predictions"):
        lines += ["", f"Ground-truth cases without a prediction (scored as all background in `mean, missing = 0`): "
                      f"{', '.join(result['missing_predictions'])}"]
    t = result["tolerances_mm"]
    lines += ["", f"Kidney = label > 0 (composite), tumour = label == 2. SD = surface Dice at the KiTS21 tolerances "
                  f"({t['kidney']:.3f} mm kidney, {t['tumor']:.3f} mm tumour). "
                  f"Both empty: Dice = IoU = SD = 1, HD95 = 0; "
                  f"one empty: Dice = IoU = SD = 0, HD95 undefined (-, left out of the mean: tumour HD95 over "
                  f"{m['n_cases'] - m['n_tumor_hd95_undefined']} of {m['n_cases']} cases). "
                  f"Detection: a ground-truth tumour component is hit when a voxel of it is predicted tumour, "
                  f"in the wrong kidney when not hit and the largest false-positive tumour component lies on the other "
                  f"side of the midline, else missed.", ""]
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> list[Path]:
    """Write ``out`` (JSON) and the CSV and markdown beside it, atomically."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".json" else out
    paths = [stem.with_suffix(".json"), stem.with_suffix(".csv"), stem.with_suffix(".md")]
    fsutil.write_json(paths[0], result)
    fsutil.write_text(paths[1], to_csv(result))
    fsutil.write_text(paths[2], to_markdown(result))
    return paths


def kits23_markdown(result: dict) -> str:
    """A KiTS23 evaluation (``regions: kits23``) as markdown: per case, the average and the leaderboard means."""
    cols = result["columns"]
    lines = ["# Evaluation (KiTS23 hierarchical evaluation classes)", "",
             f"Predictions `{result['pred_dir']}` against ground truth `{result['gt_dir']}`: "
             f"{result['mean']['n_cases']} cases.", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in result["cases"]:
        lines.append("| " + " | ".join([c["case_id"], *(_fmt(c[k]) for k in cols[1:])]) + " |")
    m = result["mean"]
    lines.append("| **average** | " + " | ".join(f"**{_fmt(m[k])}**" for k in cols[1:]) + " |")
    t = result["tolerances_mm"]
    lines += ["", f"Mean over the three regions: Dice **{m['mean_dice']:.4f}**, surface Dice **{m['mean_sd']:.4f}** "
                  f"(the leaderboard's figures). Regions: kidney = {{1,2,3}}, masses = {{2,3}}, tumour = {{2}}; "
                  f"surface Dice at {t['kidney']:.4f} / {t['masses']:.4f} / {t['tumor']:.4f} mm; a region empty "
                  "in both truth and prediction scores 1, empty in one of them 0.", ""]
    return "\n".join(lines)


def write_kits23_outputs(result: dict, out: Path, csv_text: str) -> list[Path]:
    """Write a KiTS23 evaluation: ``out`` (JSON), the official ``evaluation.csv`` table and markdown beside it.

    Args:
        result: ``{"regions": "kits23", "columns", "cases", "mean", "tolerances_mm", "pred_dir", "gt_dir"}``.
        out: the JSON path; the CSV and markdown share its stem.
        csv_text: the CSV in the columns of the official ``evaluation.csv`` (``hpc_dfs.metrics.kits23.to_csv``).

    Raises:
        hpc_dfs.fsutil.DiskWriteError: the file system refused a write.
    """
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".json" else out
    paths = [stem.with_suffix(".json"), stem.with_suffix(".csv"), stem.with_suffix(".md")]
    fsutil.write_json(paths[0], result)
    fsutil.write_text(paths[1], csv_text)
    fsutil.write_text(paths[2], kits23_markdown(result))
    return paths


def read_evaluation(path: Path) -> Evaluation:
    """An ``eval.json`` written by ``hpc-dfs evaluate``.

    Args:
        path: the JSON file.

    Raises:
        OSError, ValueError: the file cannot be read as JSON (callers name the file).
    """
    return json.loads(Path(path).read_text())


def default_eval_path(run: Path, pred: Optional[Path]) -> Optional[Path]:
    """Where an evaluation of ``run`` usually lies: beside or inside PRED, else in RUN; None when none is there.

    Args:
        run: the run folder.
        pred: the prediction folder, or None.
    """
    for cand in ([pred.parent / EVAL_NAME, pred / EVAL_NAME] if pred else []) + [run / EVAL_NAME]:
        if cand.is_file():
            return cand
    return None
