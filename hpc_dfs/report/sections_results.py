"""The sections about results: evaluation (ranked cases), overlays, prediction, the clinical model."""
from __future__ import annotations

import json
from pathlib import Path

from hpc_dfs.contracts.prediction import SUMMARY_NAME
from hpc_dfs.report.charts import calibration_png, case_overlay, overlay_choice, roc_png
from hpc_dfs.report.html import esc, figure, flatten_numbers, fmt, img_tag, missing, num, table
from hpc_dfs.report.sources import read_json, truth_labels
from hpc_dfs.report.stats import finite

__all__ = ["RANK_METRIC", "ranked_cases", "case_table", "section_evaluation", "section_overlays",
           "section_prediction", "clinical_table", "section_clinical"]


RANK_METRIC = ("tumor_dice", "tumour Dice")


def ranked_cases(evaluation: dict) -> list[dict]:
    """Every case (missing predictions included), worst first by tumour Dice, then kidney Dice, then case id."""
    cases = list(evaluation.get("cases", [])) + list(evaluation.get("missing_cases", []))
    return sorted(cases, key=lambda c: (c.get(RANK_METRIC[0]) if finite(c.get(RANK_METRIC[0])) else -1.0,
                                        c.get("kidney_dice") or 0.0, c["case_id"]))


def _detection_cell(c: dict) -> str:
    word = c.get("detection")
    if word is None:
        return "-"
    fp = c.get("n_fp_components")
    extra = f"; {fp} false-positive component(s), {num(c.get('fp_ml'), 'ml')} ml" if fp else ""
    style = " style='color:#a33;font-weight:600'" if word in ("missed", "wrong kidney", "partial") else ""
    return f"<span{style}>{esc(word)}</span>{esc(extra)}"


CASE_HEAD = ("case", "rank", "kidney Dice", "tumour Dice", "KiTS19 score", "tumour ml (truth)", "tumour ml (predicted)",
             "tumour detection", "tumour HD95 (mm)", "tumour SD")


def case_table(evaluation: dict) -> str:
    """Per-case metrics and detection, ranked by ``RANK_METRIC`` (worst first), with the means and their n."""
    rows = []
    for i, c in enumerate(ranked_cases(evaluation), 1):
        name = c["case_id"] + (" (no prediction)" if c.get("status") == "missing prediction" else "")
        rows.append([esc(name), str(i), num(c.get("kidney_dice")), num(c.get("tumor_dice")), num(c.get("kits_score")),
                     num(c.get("tumor_ml_gt"), "ml"), num(c.get("tumor_ml_pred"), "ml"), _detection_cell(c),
                     num(c.get("tumor_hd95"), "mm"), num(c.get("tumor_surface_dice"))])
    for label, m in (("mean", evaluation.get("mean") or {}), ("mean, missing = Dice 0", evaluation.get("mean_all"))):
        if not m or (label != "mean" and not m.get("n_missing")):
            continue
        hd_n = m.get("n_cases", 0) - m.get("n_tumor_hd95_undefined", 0)
        rows.append([f"<b>{esc(label)} (n={esc(m.get('n_cases'))})</b>", "", num(m.get("kidney_dice")),
                     num(m.get("tumor_dice")), num(m.get("kits_score")), num(m.get("tumor_ml_gt"), "ml"),
                     num(m.get("tumor_ml_pred"), "ml"),
                     esc(f"{m.get('n_tumors_hit', 0)} hit, {m.get('n_tumors_missed', 0)} missed, "
                         f"{m.get('n_tumors_wrong_kidney', 0)} wrong kidney"),
                     f"{num(m.get('tumor_hd95'), 'mm')} (n={hd_n})", num(m.get("tumor_surface_dice"))])
    return table(CASE_HEAD, rows, raw=True)


def section_evaluation(evaluation: dict | None, eval_path: Path | None) -> str:
    """The evaluation: ranked per-case table, detection rule, effect of post-processing."""
    out = ["<h2>Evaluation</h2>"]
    if evaluation is None:
        return out[0] + missing("no evaluation", "run `hpc-dfs evaluate --pred PRED --gt DATA --out EVAL.json` and "
                                                 "pass --eval EVAL.json")
    m = evaluation.get("mean", {})
    tol = evaluation.get("tolerances_mm") or {}
    out.append(f"<p><code>{esc(eval_path)}</code>: {esc(m.get('n_cases'))} cases evaluated, ranked by "
               f"<b>{RANK_METRIC[1]}</b>, worst first. Kidney = label &gt; 0, tumour = label == 2 (KiTS19); KiTS19 "
               f"score = their mean; HD95 in mm, undefined (-) when prediction or truth is empty and then left out "
               f"of the mean (its n is shown); SD = surface Dice at the KiTS21 tolerances "
               f"({esc(fmt(tol.get('kidney'), 2))} mm kidney, {esc(fmt(tol.get('tumor'), 2))} mm tumour).</p>")
    out.append(case_table(evaluation))
    out.append("<p class='note'>Tumour detection per ground-truth tumour component (6-connected): <b>hit</b> when a "
               "voxel of it is predicted tumour; <b>wrong kidney</b> when not hit and the largest false-positive "
               "tumour component lies on the other side of the midline between the two ground-truth kidneys; "
               "otherwise <b>missed</b>. A false-positive component touches no ground-truth tumour.</p>")
    pp = evaluation.get("postprocessing")
    if pp:
        out += ["<p>Effect of post-processing on mean Dice:</p>",
                table(["", "kidney Dice", "tumour Dice", "KiTS19 score"],
                      [[name, *(num(pp[name][k]) for k in ("kidney_dice", "tumor_dice", "kits_score"))]
                       for name in ("raw", "postprocessed", "delta")])]
    if evaluation.get("errors"):
        out.append("<p class='missing'>Not evaluated: " + esc("; ".join(f"{e['case_id']}: {e['error']}"
                                                                        for e in evaluation["errors"])) + "</p>")
    return "\n".join(out)


def section_overlays(evaluation: dict | None, pred: Path | None) -> str:
    """Overlays of the worst and best cases through the ground-truth tumour."""
    if not evaluation or not (evaluation.get("cases") or evaluation.get("missing_cases")):
        return ""
    out = ["<h2>Best and worst cases</h2>",
           f"<p class='note'>Ranked by {RANK_METRIC[1]} (the table above). Each picture cuts through the centroid of "
           "the largest ground-truth tumour component: ground truth, prediction and the error map side by side "
           "(yellow/orange = truth missed, cyan/magenta = false positive, for kidney/tumour).</p><div class='grid'>"]
    for tag, c in overlay_choice(ranked_cases(evaluation)):
        png, source = case_overlay(c["case_id"], evaluation, pred)
        cap = (f"{esc(tag)}: {esc(c['case_id'])} &mdash; {RANK_METRIC[1]} {num(c.get('tumor_dice'))}, kidney Dice "
               f"{num(c.get('kidney_dice'))}; tumour {num(c.get('tumor_ml_gt'), 'ml')} ml in truth, "
               f"{num(c.get('tumor_ml_pred'), 'ml')} ml predicted; detection: {esc(c.get('detection', '-'))}"
               + (" (predict's picture: prediction only)" if source == "predict" else ""))
        body = img_tag(png, c["case_id"]) if png else missing("no overlay", "CT or prediction not found")
        out.append(f"<figure>{body}<figcaption>{cap}</figcaption></figure>")
    out.append("</div>")
    return "\n".join(out)


def section_prediction(pred: Path | None, evaluation: dict | None) -> str:
    """Prediction summary; per case volumes, P(malignant) and the true label."""
    out = ["<h2>Prediction</h2>"]
    if pred is None or not (pred / SUMMARY_NAME).is_file():
        return out[0] + missing("no prediction summary",
                                "run `hpc-dfs predict --checkpoint CKPT --input DATA --out PRED` and pass --pred PRED")
    s = read_json(pred / SUMMARY_NAME)
    cfg = s.get("config", {})
    ckpts = ", ".join(f"{Path(c['path']).name} x {c['weight']:.3g}" for c in s.get("checkpoints", []))
    out.append(f"<p><code>{esc(pred)}</code>: {s.get('n_ok')} of {s.get('n_cases')} cases on {s.get('world_size')} "
               f"rank(s) ({esc(s.get('device', 'device not recorded'))}) in {num(s.get('wall_seconds'), 's')} s; "
               f"{len(s.get('checkpoints', []))} checkpoint(s) averaged ({esc(ckpts)}); "
               f"TTA {'on' if cfg.get('tta') else 'off'}; post-processing "
               f"{'on' if (cfg.get('postprocess') or {}).get('enabled') else 'off'}.</p>")
    truth = truth_labels(evaluation, s)
    rows = []
    for c in s.get("cases", []):
        vol = c.get("volumes_ml") or {}
        t = truth.get(c["case_id"])
        rows.append([c["case_id"], c.get("status"), c.get("shape"), num(vol.get("kidney"), "ml"),
                     num(vol.get("tumor"), "ml"), num(c.get("risk_prob")),
                     "malignant" if t is True else "benign" if t is False else "unknown",
                     c.get("clinical_used"), num((c.get("seconds") or {}).get("total"), "s"), c.get("rank"),
                     c.get("error", "")])
    out.append(table(["case", "status", "shape", "kidney ml", "tumour ml", "P(malignant) (risk head)",
                      "truth (kits.json)", "clinical used", "seconds", "rank", "error"], rows))
    out.append("<p class='note'>P(malignant) is the fusion model's risk head: its estimate that the tumour is "
               "malignant, from the CT and the clinical record. The truth column is the test data's "
               "<code>malignant</code> field; at this n the comparison is anecdotal.</p>")
    return "\n".join(out)


def clinical_table(models: dict, source: Path) -> str:
    """Models as rows; per metric the pooled out-of-fold value and the fold mean ± sd, when given so."""
    if not models:
        return missing(f"{source} lists no models", "expected `hpc-dfs clinical`'s metrics.json")
    if all(isinstance(m.get("pooled"), dict) for m in models.values()):
        keys = list(dict.fromkeys(k for m in models.values() for k, v in m["pooled"].items()
                                  if isinstance(v, (int, float)) or v is None))
        rows = []
        for name, m in models.items():
            cells = [m.get("label", name)]
            for k in keys:
                mean, sd = (m.get("mean") or {}).get(k), (m.get("sd") or {}).get(k)
                fold = f" ({fmt(mean, 3)} ± {fmt(sd, 3)})" if mean is not None else ""
                cells.append(f"{fmt(m['pooled'].get(k))}{fold}")
            rows.append(cells)
        return (f"<p><code>{esc(source)}</code>: pooled out-of-fold value (fold mean ± sd).</p>"
                + table(["model", *keys], rows))
    flat = {name: flatten_numbers(v) for name, v in models.items()}
    keys = sorted({k for f in flat.values() for k, v in f.items() if isinstance(v, (int, float))})
    return f"<p><code>{esc(source)}</code>:</p>" + table(["metric", *flat], [[k, *(flat[n].get(k) for n in flat)]
                                                                          for k in keys])


def _captions(clin: Path, positive: str, negative: str) -> dict[str, str]:
    caps = {"shap_bar.png": f"SHAP of the Clinical-GRU: mean |SHAP| per feature, in log-odds of {positive}.",
            "shap_beeswarm.png": f"SHAP of the Clinical-GRU per patient and feature (log-odds of {positive}; colour "
                                 "= feature value, high red).",
            "confusion_matrices.png": f"Confusion matrices, out-of-fold, {positive} at P >= 0.5.",
            "roc.png": "ROC as drawn by `hpc-dfs clinical`."}
    pj = clin / "shap_patient.json"
    if pj.is_file():
        try:
            pt = json.loads(pj.read_text())
            truth = positive if pt.get("y_true") == 1 else negative
            caps[str(pt.get("plot"))] = (f"One patient's SHAP explanation (waterfall, log-odds of {positive}): "
                                         f"{pt.get('id')}, truly {truth}, predicted P({positive}) = "
                                         f"{num(pt.get('y_prob'))}.")
        except (OSError, json.JSONDecodeError):
            pass
    return caps


def section_clinical(clin: Path | None, ctx: dict) -> str:
    """Clinical metrics, ROC and calibration plots, and the captioned pictures of ``hpc-dfs clinical``."""
    out = ["<h2>Clinical model</h2>"]
    if clin is None or not clin.is_dir():
        return out[0] + missing("no clinical results", "run `hpc-dfs clinical --data FILE --folds 5 --seed 0 --out "
                                                       "CLIN` and pass --clinical CLIN")
    metrics = ctx["clin_metrics"]
    data = (metrics or {}).get("data") if isinstance(metrics, dict) else None
    positive = (data or {}).get("positive_class") or "positive class (label 1)"
    negative = (data or {}).get("negative_class") or "negative class (label 0)"
    if metrics is not None:
        models = metrics.get("models") if isinstance(metrics, dict) else None
        if not isinstance(models, dict):  # tolerate a flat {model: {...}} file
            models = {k: v for k, v in metrics.items() if isinstance(v, dict)} if isinstance(metrics, dict) else {}
        out.append(clinical_table(models, clin / "metrics.json"))
        if isinstance(data, dict):
            out.append(f"<p class='note'>Data: {esc(fmt(data))}; {esc(metrics.get('folds'))} folds, seed "
                       f"{esc(metrics.get('seed'))}. Positive class: <b>{esc(positive)}</b>.</p>")
    else:
        out.append(missing(f"no {clin / 'metrics.json'}", "written by `hpc-dfs clinical`"))
    oof, stats = ctx["clin_oof"], ctx["clin_stats"]
    figs = []
    if stats:
        labels = {m: s["label"] for m, s in stats.items()}
        figs.append(figure(roc_png(oof, stats, positive), "ROC", f"ROC of each model for <b>{esc(positive)}</b>, "
                           "out-of-fold, with the chance line and the majority-class predictor (both AUC 0.5)."))
        figs.append(figure(calibration_png(oof, labels, positive), "calibration",
                           f"Calibration: observed share of {esc(positive)} against the predicted probability. "
                           "Points far from the diagonal are over- or under-confident."))
    caps = _captions(clin, positive, negative)
    pngs = sorted(clin.glob("*.png"), key=lambda p: (0 if "shap" in p.name.lower() else 1, p.name))
    figs += [figure(p.read_bytes(), p.stem, esc(caps.get(p.name, p.stem.replace("_", " "))))
             for p in pngs if not (stats and p.name == "roc.png")]
    if figs:
        out += ["<div class='grid'>", *figs, "</div>"]
    return "\n".join(out)
