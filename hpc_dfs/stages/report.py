"""One self-contained HTML report of a run: ``hpc-dfs report``.

    hpc-dfs report runs/r1                                   # -> runs/r1/report.html
    hpc-dfs report runs/r1 --pred runs/r1/pred --eval runs/r1/eval.json --clinical clin/ --out r1.html

It reads only the files the stages wrote (CONTRACTS.md), never their code:

============================  ===========================================================
source                        section
============================  ===========================================================
RUN/checkpoints/best.pt       run (epoch, ranks, model), configuration, data summary
(or last.pt)                  (preprocessing, classes, clinical features), validation metrics
SHARDS/manifest.json          data summary: cases, folds, fingerprint (``--shards``)
RUN/metrics.jsonl, curves.png training curves (rendered from metrics.jsonl when curves.png is missing)
PRED/summary.json, risk.csv   prediction: per-case timing, volumes, risk
EVAL.json                     evaluation table, effect of post-processing, best and worst cases
                              (overlays of prediction and ground truth, or PRED/overlay_XXXXX.png)
CLIN/metrics.json, CLIN/*.png clinical metrics per model and the SHAP / ROC / confusion plots
============================  ===========================================================

Defaults: ``--pred RUN/pred``, ``--eval PRED/../eval.json`` or ``RUN/eval.json``, ``--out RUN/report.html``.
A missing source leaves its section with one line saying what is missing and which command makes it.
Images are embedded as base64 PNGs, so the single file can be mailed or attached to a ticket.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hpc_dfs import __version__, fsutil
from hpc_dfs.log import get_logger

CLI_LONG_HELP = True  # `hpc-dfs report --help` shows this module's whole docstring

log = get_logger("hpc_dfs.report")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;
line-height:1.45;padding:0 1em}
h1{border-bottom:2px solid #345;padding-bottom:.2em}h2{margin-top:2em;color:#234;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ccd;padding:.25em .6em;
text-align:right}th{background:#eef2f7}td:first-child,th:first-child{text-align:left}
.missing{color:#a33;font-style:italic}.note{color:#555;font-size:.9em}img{max-width:100%;border:1px solid #dde;
margin:.4em 0}details{margin:.5em 0}code{background:#f3f3f6;padding:0 .25em}
.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{margin:0;flex:1 1 45%}figcaption{font-size:.9em;color:#444}
"""


class ReportError(ValueError):
    """The run folder cannot be reported on (named in the message)."""


# ----------------------------------------------------------------------------- small HTML helpers
def esc(v: Any) -> str:
    return html.escape(str(v))


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt(x, digits)}" for k, x in v.items())
    return str(v)


def table(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kv_table(d: dict) -> str:
    return table(["setting", "value"], [(k, v) for k, v in d.items()])


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def missing(what: str, how: str) -> str:
    return f'<p class="missing">{esc(what)} &mdash; {esc(how)}</p>'


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path} cannot be read as JSON: {e}") from None


# ----------------------------------------------------------------------------- sources
def find_checkpoint(run: Path) -> Path | None:
    for name in ("best.pt", "last.pt"):
        if (run / "checkpoints" / name).is_file():
            return run / "checkpoints" / name
    pts = sorted((run / "checkpoints").glob("*.pt")) if (run / "checkpoints").is_dir() else []
    return pts[-1] if pts else None


def load_checkpoint_meta(path: Path) -> dict:
    """Everything of a checkpoint except the tensors (model, optimizer, RNG states), read through the schema."""
    from hpc_dfs.training import checkpoint as ckpt_schema
    try:
        return ckpt_schema.read_meta(path)
    except ckpt_schema.CheckpointError as e:
        raise ReportError(str(e)) from None


def read_metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ReportError(f"{p} line {i} is not JSON: {e}") from None
    return rows


def curves_png(rows: list[dict]) -> bytes:
    """Loss, Dice and risk per epoch from metrics.jsonl rows (used when RUN/curves.png is missing)."""
    from matplotlib.figure import Figure

    from hpc_dfs.visualize import figure_png
    fig = Figure(figsize=(13, 3.6), dpi=100)
    axes = fig.subplots(1, 3)
    panels = [("loss", [("train_loss", "train"), ("val_loss", "validation")]),
              ("Dice", [("kidney_dice", "kidney"), ("tumor_dice", "tumour")]),
              ("risk", [("risk_auc", "AUC"), ("risk_acc", "accuracy")])]
    for ax, (name, keys) in zip(axes, panels):
        for key, label in keys:
            pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "epoch" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    return figure_png(fig)


def best_worst(cases: list[dict], n: int = 2) -> tuple[list[dict], list[dict]]:
    """Best and worst cases by KiTS19 score (ties broken by case id); disjoint when possible."""
    ranked = sorted(cases, key=lambda c: (-(c.get("kits_score") or 0.0), c["case_id"]))
    k = min(n, len(ranked) // 2) if len(ranked) > 1 else len(ranked)
    return ranked[:k], ranked[::-1][:k] if len(ranked) > 1 else []


def case_overlay(case_id: str, evaluation: dict, pred_dir: Path | None) -> bytes | None:
    """Prediction and ground truth over the CT, rendered fresh; else PRED's overlay PNG; else None."""
    import nibabel as nib

    from hpc_dfs.visualize import figure_png, overlay_figure
    sfx = case_id.split("_", 1)[1] if case_id.startswith("case_") else case_id
    gt_dir = Path(evaluation.get("gt_dir", "")) / case_id
    pdir = Path(evaluation.get("pred_dir", "")) if evaluation.get("pred_dir") else pred_dir
    try:
        from hpc_dfs.stages.evaluate import GT_NAMES
        gt_path = next((gt_dir / n for n in GT_NAMES if (gt_dir / n).exists()), None)
        img_path, pred_path = gt_dir / "imaging.nii.gz", (pdir / f"prediction_{sfx}.nii.gz") if pdir else None
        if gt_path and img_path.exists() and pred_path and pred_path.exists():
            img = nib.load(str(img_path))
            fig = overlay_figure(np.asanyarray(img.dataobj), np.asanyarray(nib.load(str(pred_path)).dataobj),
                                 img.affine, title=case_id, gt=np.asanyarray(nib.load(str(gt_path)).dataobj))
            return figure_png(fig)
    except Exception as e:  # a picture must not stop the report
        log.warning("%s: cannot render the overlay (%s); using the predict overlay if any", case_id, e)
    for d in (pdir, pred_dir):
        if d and (d / f"overlay_{sfx}.png").is_file():
            return (d / f"overlay_{sfx}.png").read_bytes()
    return None


def flatten_numbers(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value}; lists of plain values are kept (shown comma-separated), others left out."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten_numbers(v, f"{prefix}{k}."))
    elif isinstance(d, (int, float, str, bool)) or d is None:
        out[prefix[:-1]] = d
    elif isinstance(d, (list, tuple)) and len(d) <= 16 and all(
            isinstance(x, (int, float, str, bool)) or x is None for x in d):
        out[prefix[:-1]] = list(d)
    return out


# ----------------------------------------------------------------------------- sections
def section_run(meta: dict | None, ckpt: Path | None, run: Path) -> str:
    if meta is None:
        return "<h2>Run</h2>" + missing(f"no checkpoint in {run / 'checkpoints'}",
                                        "run `hpc-dfs train --out RUN` first")
    mc = meta.get("model_config") or {}
    rows = {"checkpoint": str(ckpt), "epochs completed": meta.get("epoch"), "optimizer steps": meta.get("step"),
            "ranks (world size)": meta.get("world_size"), "model": mc.get("name"),
            "parameters": meta.get("n_parameters"), "hpc-dfs version": meta.get("hpc_dfs_version"),
            "manifest sha256": (meta.get("manifest_sha256") or "")[:16]}
    cfg = meta.get("config")
    if isinstance(cfg, dict):
        for key in ("epochs", "global_batch_size", "batch_size", "optimizer", "lr", "scheduler", "loss", "fg_fraction",
                    "risk_weight", "augment", "sync_bn", "amp", "val_fold", "seed"):
            if key in cfg:
                rows[f"train: {key}"] = cfg[key]
    out = ["<h2>Run</h2>", kv_table(rows), "<details><summary>model configuration</summary>", kv_table(mc),
           "</details>"]
    if isinstance(cfg, dict):
        out += ["<details><summary>full training configuration</summary>", kv_table(flatten_numbers(cfg)), "</details>"]
    elif (run / "config.toml").is_file():
        out += ["<details open><summary>config.toml</summary><pre>", esc((run / "config.toml").read_text()),
                "</pre></details>"]
    return "\n".join(out)


def section_data(meta: dict | None, shards: Path | None) -> str:
    out = ["<h2>Data</h2>"]
    if meta and meta.get("preprocessing"):
        pre = meta["preprocessing"]
        out += ["<p>Preprocessing stored with the model (predict reproduces it exactly):</p>",
                kv_table(flatten_numbers(pre))]
        clin = meta.get("clinical") or {}
        names = clin.get("feature_names") or []
        if names:
            out.append(f"<p>{len(names)} clinical input features: <code>{esc(', '.join(names))}</code></p>")
    manifest = None
    if shards and (shards / "manifest.json").is_file():
        manifest = _read_json(shards / "manifest.json")
    if manifest:
        cases = manifest.get("cases", [])
        folds: dict = {}
        for c in cases:
            folds[c.get("fold")] = folds.get(c.get("fold"), 0) + 1
        risk = [c.get("risk_label") for c in cases]
        slices = [c.get("n_slices", 0) for c in cases]
        out += [f"<p>Shards <code>{esc(shards)}</code>:</p>", kv_table({
            "cases": len(cases), "slices": sum(slices), "cases per fold": dict(sorted(folds.items(), key=str)),
            "malignant / benign / unknown": f"{risk.count(1)} / {risk.count(0)} / "
                                            f"{sum(r not in (0, 1) for r in risk)}",
            "slices with kidney": sum((c.get("slices_with") or {}).get("kidney", 0) for c in cases),
            "slices with tumour": sum((c.get("slices_with") or {}).get("tumor", 0) for c in cases)})]
        fp = manifest.get("fingerprint")
        if isinstance(fp, dict):
            out += ["<details><summary>dataset fingerprint</summary>", kv_table(flatten_numbers(fp)), "</details>"]
    elif not meta:
        out.append(missing("no checkpoint and no manifest", "pass --shards SHARDS or train a model"))
    else:
        out.append('<p class="note">Pass <code>--shards SHARDS</code> for case counts, folds and the fingerprint.</p>')
    return "\n".join(out)


def section_curves(run: Path, rows: list[dict]) -> str:
    out = ["<h2>Training curves</h2>"]
    if (run / "curves.png").is_file():
        out.append(img_tag((run / "curves.png").read_bytes(), "training curves"))
    elif rows:
        out.append(img_tag(curves_png(rows), "training curves (rendered from metrics.jsonl)"))
    else:
        return out[0] + missing(f"no {run / 'metrics.jsonl'}", "written by `hpc-dfs train` after every epoch")
    if rows:
        keys = [k for k in ("epoch", "train_loss", "val_loss", "kidney_dice", "tumor_dice", "risk_auc", "risk_acc",
                            "samples_per_s", "allreduce_frac", "lr") if any(k in r for r in rows)]
        shown = rows if len(rows) <= 12 else rows[:3] + rows[-9:]
        more = "; first 3 and last 9 shown" if len(rows) > 12 else ""
        out += [f"<details><summary>metrics.jsonl ({len(rows)} epochs{more})</summary>", table(keys, [[r.get(k) for k in keys] for r in shown]), "</details>"]
    return "\n".join(out)


def section_validation(meta: dict | None, rows: list[dict]) -> str:
    out = ["<h2>Validation metrics</h2>"]
    m = (meta or {}).get("metrics")
    if isinstance(m, dict) and m:
        out += ["<p>Stored with the checkpoint (validation fold, slice-level model on resampled slices):</p>",
                kv_table(flatten_numbers(m))]
    scored = [r for r in rows if isinstance(r.get("kidney_dice"), (int, float))]
    if scored:
        best = max(scored, key=lambda r: (r.get("kidney_dice", 0) + r.get("tumor_dice", 0)) / 2)
        out.append(f"<p>Best epoch by mean Dice: {esc(best.get('epoch'))} (kidney {fmt(best.get('kidney_dice'))}, "
                   f"tumour {fmt(best.get('tumor_dice'))}).</p>")
    if len(out) == 1:
        out.append(missing("no validation metrics", "they come from `hpc-dfs train` (checkpoint and metrics.jsonl)"))
    return "\n".join(out)


def section_prediction(pred: Path | None) -> str:
    out = ["<h2>Prediction</h2>"]
    if pred is None or not (pred / "summary.json").is_file():
        return out[0] + missing("no prediction summary",
                                "run `hpc-dfs predict --checkpoint CKPT --input DATA --out PRED` and pass --pred PRED")
    s = _read_json(pred / "summary.json")
    cfg = s.get("config", {})
    ckpts = ", ".join(f"{Path(c['path']).name} x {c['weight']:.3g}" for c in s.get("checkpoints", []))
    out.append(f"<p><code>{esc(pred)}</code>: {s.get('n_ok')} of {s.get('n_cases')} cases on {s.get('world_size')} "
               f"rank(s) in {fmt(s.get('wall_seconds'), 2)} s; {len(s.get('checkpoints', []))} checkpoint(s) averaged "
               f"({esc(ckpts)}); "
               f"TTA {'on' if cfg.get('tta') else 'off'}; post-processing "
               f"{'on' if (cfg.get('postprocess') or {}).get('enabled') else 'off'}.</p>")
    rows = []
    for c in s.get("cases", []):
        vol = c.get("volumes_ml") or {}
        rows.append([c["case_id"], c.get("status"), c.get("shape"), vol.get("kidney"), vol.get("tumor"),
                     c.get("risk_prob"), c.get("clinical_used"), (c.get("seconds") or {}).get("total"),
                     c.get("rank"), c.get("error", "")])
    out.append(table(["case", "status", "shape", "kidney ml", "tumour ml", "risk", "clinical used", "seconds", "rank",
                      "error"], rows))
    return "\n".join(out)


def section_evaluation(evaluation: dict | None, eval_path: Path | None, pred: Path | None) -> str:
    out = ["<h2>Evaluation</h2>"]
    if evaluation is None:
        return out[0] + missing("no evaluation",
                                "run `hpc-dfs evaluate --pred PRED --gt DATA --out EVAL.json` and pass --eval EVAL.json")
    from hpc_dfs.stages.evaluate import MD_HEAD, MD_KEYS
    m = evaluation.get("mean", {})
    out.append(f"<p><code>{esc(eval_path)}</code>: {m.get('n_cases')} cases. Kidney = label &gt; 0, "
               f"tumour = label == 2 (KiTS19); KiTS19 score = their mean; SD = surface Dice at the KiTS21 tolerances; HD95 in mm.</p>")
    rows = [[c["case_id"], *(c.get(k) for k in MD_KEYS)] for c in evaluation.get("cases", [])]
    rows.append(["mean", *(m.get(k) for k in MD_KEYS)])
    out.append(table(MD_HEAD, rows))
    pp = evaluation.get("postprocessing")
    if pp:
        out += ["<p>Effect of post-processing on mean Dice:</p>",
                table(["", "kidney Dice", "tumour Dice", "KiTS19 score"],
                      [[name, *(pp[name][k] for k in ("kidney_dice", "tumor_dice", "kits_score"))]
                       for name in ("raw", "postprocessed", "delta")])]
    if evaluation.get("errors"):
        out.append("<p class='missing'>Not evaluated: " + esc("; ".join(f"{e['case_id']}: {e['error']}"
                                                                        for e in evaluation["errors"])) + "</p>")
    cases = evaluation.get("cases", [])
    if cases:
        best, worst = best_worst(cases)
        out.append("<h2>Best and worst cases</h2><div class='grid'>")
        for tag, group in (("best", best), ("worst", worst)):
            for c in group:
                png = case_overlay(c["case_id"], evaluation, pred)
                cap = (f"{tag}: {c['case_id']} &mdash; kidney Dice {fmt(c.get('kidney_dice'))}, tumour Dice "
                       f"{fmt(c.get('tumor_dice'))}")
                body = img_tag(png, c["case_id"]) if png else missing("no overlay", "CT or prediction not found")
                out.append(f"<figure>{body}<figcaption>{cap}</figcaption></figure>")
        out.append("</div>")
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


def section_clinical(clin: Path | None) -> str:
    out = ["<h2>Clinical model</h2>"]
    if clin is None or not clin.is_dir():
        return out[0] + missing("no clinical results",
                                "run `hpc-dfs clinical --data FILE --folds 5 --seed 0 --out CLIN` and pass --clinical CLIN")
    if (clin / "metrics.json").is_file():
        metrics = _read_json(clin / "metrics.json")
        models = metrics.get("models") if isinstance(metrics, dict) else None
        if not isinstance(models, dict):  # tolerate a flat {model: {...}} file
            models = {k: v for k, v in metrics.items() if isinstance(v, dict)} if isinstance(metrics, dict) else {}
        out.append(clinical_table(models, clin / "metrics.json"))
        data = metrics.get("data") if isinstance(metrics, dict) else None
        if isinstance(data, dict):
            out.append(f"<p class='note'>Data: {esc(fmt(data))}; {esc(metrics.get('folds'))} folds, seed "
                       f"{esc(metrics.get('seed'))}. {esc(metrics.get('metric_notes', ''))}</p>")
    else:
        out.append(missing(f"no {clin / 'metrics.json'}", "written by `hpc-dfs clinical`"))
    pngs = sorted(clin.glob("*.png"), key=lambda p: (0 if "shap" in p.name.lower() else 1, p.name))
    if pngs:
        out.append("<div class='grid'>")
        out += [f"<figure>{img_tag(p.read_bytes(), p.stem)}<figcaption>{esc(p.name)}</figcaption></figure>"
                for p in pngs]
        out.append("</div>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- assembly
def build_report(run: Path, pred: Path | None = None, eval_path: Path | None = None, clin: Path | None = None,
                 shards: Path | None = None) -> str:
    """The report's HTML text."""
    run = Path(run)
    if not run.is_dir():
        raise ReportError(f"run folder {run} does not exist")
    ckpt = find_checkpoint(run)
    meta = load_checkpoint_meta(ckpt) if ckpt else None
    if pred is None and (run / "pred").is_dir():
        pred = run / "pred"
    if eval_path is None:
        for cand in ([pred.parent / "eval.json", pred / "eval.json"] if pred else []) + [run / "eval.json"]:
            if cand.is_file():
                eval_path = cand
                break
    evaluation = _read_json(eval_path) if eval_path else None
    if eval_path and not isinstance(evaluation, dict):
        raise ReportError(f"{eval_path} is not an `hpc-dfs evaluate` JSON")
    if shards is None and meta and isinstance(meta.get("config"), dict) and meta["config"].get("shards"):
        shards = Path(meta["config"]["shards"])
    rows = read_metrics(run)
    name = run.resolve().name
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = []
    if evaluation and evaluation.get("mean", {}).get("kits_score") is not None:
        m = evaluation["mean"]
        summary.append(f"KiTS19 score <b>{fmt(m['kits_score'])}</b> (kidney Dice {fmt(m['kidney_dice'])}, tumour Dice "
                       f"{fmt(m['tumor_dice'])}) on {m['n_cases']} cases")
    if meta:
        summary.append(f"model {esc((meta.get('model_config') or {}).get('name'))} after {esc(meta.get('epoch'))} "
                       f"epochs on {esc(meta.get('world_size'))} rank(s)")
    body = [f"<h1>hpc-dfs run report: {esc(name)}</h1>",
            f"<p class='note'>Generated {created} by hpc-dfs {__version__} from <code>{esc(run)}</code>.</p>",
            f"<p>{'; '.join(summary)}.</p>" if summary else "",
            section_run(meta, ckpt, run), section_data(meta, shards), section_curves(run, rows),
            section_validation(meta, rows), section_evaluation(evaluation, eval_path, pred), section_prediction(pred),
            section_clinical(clin)]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>hpc-dfs report {esc(name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run folder written by `hpc-dfs train` (RUN)")
    parser.add_argument("--pred", type=Path, default=None, help="predictions folder (default RUN/pred)")
    parser.add_argument("--eval", dest="eval_path", type=Path, default=None,
                        help="evaluation JSON (default PRED/../eval.json or RUN/eval.json)")
    parser.add_argument("--clinical", type=Path, default=None, help="output folder of `hpc-dfs clinical` (CLIN)")
    parser.add_argument("--shards", type=Path, default=None, help="shards folder, for the data summary")
    parser.add_argument("--out", type=Path, default=None, help="HTML file to write (default RUN/report.html)")


def main(args: argparse.Namespace) -> int:
    try:
        for flag, p in (("--pred", args.pred), ("--eval", args.eval_path), ("--clinical", args.clinical),
                        ("--shards", args.shards)):
            if p is not None and not p.exists():
                raise ReportError(f"{flag} {p} does not exist")
        text = build_report(args.run, args.pred, args.eval_path, args.clinical, args.shards)
    except ReportError as e:
        log.error("%s", e)
        return 2
    out = args.out or Path(args.run) / "report.html"
    fsutil.write_text(out, text)
    log.info("wrote %s (%.1f kB)", out, len(text) / 1024)
    return 0
