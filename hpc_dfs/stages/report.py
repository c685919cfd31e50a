"""One self-contained HTML report of a run that a researcher can trust at a glance: ``hpc-dfs report``.

    hpc-dfs report runs/r1                                   # -> runs/r1/report.html
    hpc-dfs report runs/cascade                              # a `train --stage both` folder: both stages
    hpc-dfs report runs/r1 --pred runs/r1/pred --eval runs/r1/eval.json --clinical clin/ --shards shards/ --out r1.html

It reads only the files the stages wrote (CONTRACTS.md), never their code:

============================  ===========================================================
source                        section
============================  ===========================================================
RUN/checkpoints/last.pt       run facts (epochs trained, ranks, effective batch and LR), the
RUN/checkpoints/best.pt       configuration that applies; best.pt: the best epoch, the model
SHARDS/manifest.json          data: cases, train/validation split, fingerprint (``--shards``)
RUN/metrics.jsonl             curves (loss, Dice, risk, LR per epoch, best epoch marked),
                              epochs trained, total time, every epoch's metrics
PRED/summary.json, risk.csv   prediction: per-case timing, volumes, P(malignant) beside the truth
EVAL.json                     per-case table ranked by a named metric, tumour detection, effect
                              of post-processing, overlays through the ground-truth tumour
CLIN/metrics.json,            clinical metrics with AUC confidence intervals, ROC with chance and
CLIN/predictions.csv, *.png   majority-class lines, calibration plot, SHAP pictures with captions
============================  ===========================================================

At the top, a **warnings box** lists, one line each: every tumour missed or found in the wrong
kidney, a tumour Dice below 0.2, validation metrics over fewer than 10 cases, a risk AUC whose 95 %
confidence interval contains 0.5 (Hanley-McNeil for the validation AUC, a case bootstrap for the
clinical models), surface-Dice tolerances below the voxel size, the evaluated checkpoint's epoch
differing from the last one trained, and missing or failed predictions.

The epochs trained come from ``metrics.jsonl`` (else ``last.pt``), never from ``best.pt``. The
environment (torch, Horovod, device, git commit) is the one the checkpoint records under
``environment``; what it does not record is shown as "not recorded", beside the values of the
machine that wrote the report (labelled so).

A cascade folder (``train --stage both``: ``RUN/locate`` and ``RUN/refine``, no ``RUN/checkpoints``)
is reported as one run: stage 2's configuration and facts, each stage's curves and validation metrics
(stage 1 first), each stage's training warnings, and the cascade's predictions and evaluation.

Defaults: ``--pred RUN/pred``, ``--eval PRED/../eval.json`` or ``RUN/eval.json``, ``--out RUN/report.html``,
``--shards`` the folder the run was trained on. A missing source leaves its section with one line
saying what is missing and which command makes it. Images are embedded as base64 PNGs and the page
loads nothing from the network, so the single file can be mailed or attached to a ticket.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hpc_dfs import __version__, fsutil
from hpc_dfs.config import require_path
from hpc_dfs.errors import EXIT_USAGE, HpcDfsError
from hpc_dfs.log import get_logger

CLI_LONG_HELP = True  # `hpc-dfs report --help` shows this module's whole docstring

log = get_logger("hpc_dfs.report")

#: thresholds of the warnings box
TUMOR_DICE_WARN = 0.2
MIN_VAL_CASES = 10
MAX_OVERLAYS = 6

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;
line-height:1.45;padding:0 1em}
h1{border-bottom:2px solid #345;padding-bottom:.2em}h2{margin-top:2em;color:#234;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ccd;padding:.25em .6em;
text-align:right}th{background:#eef2f7}td:first-child,th:first-child{text-align:left}
.missing{color:#a33;font-style:italic}.note{color:#555;font-size:.9em}img{max-width:100%;border:1px solid #dde;
margin:.4em 0}details{margin:.5em 0}code{background:#f3f3f6;padding:0 .25em}
.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{margin:0;flex:0 1 48%}figcaption{font-size:.9em;color:#444}
.warnings{border:2px solid #c60;background:#fff6ec;padding:.4em 1.2em;margin:1em 0}
.warnings h3{margin:.3em 0;color:#a40}
.ok{border:2px solid #393;background:#f1fbf1;padding:.4em 1.2em;margin:1em 0}
.facts td:first-child{font-weight:600}table.kv td{text-align:left}tr.best td{background:#fff3d6}
"""


class ReportError(HpcDfsError, ValueError):
    """The run folder cannot be reported on (named in the message)."""

    code = EXIT_USAGE


# ----------------------------------------------------------------------------- small HTML helpers
def esc(v: Any) -> str:
    """HTML-escaped text of ``v``."""
    return html.escape(str(v))


def fmt(v: Any, digits: int = 4) -> str:
    """Generic cell text: floats with ``digits`` decimals (scientific only when tiny or huge), None as "-"."""
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


def num(v: Any, kind: str = "dice") -> str:
    """One number format per kind: dice/auc 3 decimals, ml/mm/s 1 decimal, lr 3 significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return fmt(v)
    spec = {"dice": ".3f", "ml": ".1f", "mm": ".1f", "s": ".1f", "lr": ".3g", "loss": ".4f", "int": ".0f"}[kind]
    return format(float(v), spec)


def table(header: Iterable[Any], rows: Iterable[Iterable[Any]], raw: bool = False) -> str:
    """An HTML table; cells are escaped and formatted with :func:`fmt` unless ``raw`` (pre-made HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    cell = (lambda c: str(c)) if raw else (lambda c: esc(fmt(c)))
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kv_table(d: dict, cls: str = "") -> str:
    """A two-column setting/value table (left-aligned values)."""
    t = table(["setting", "value"], [(k, v) for k, v in d.items()])
    return t.replace("<table>", f"<table class='kv {cls}'>".replace(" '", "'"), 1)


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with ``png`` embedded as base64 (no file, no request)."""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def figure(png: bytes, alt: str, caption: str) -> str:
    """A captioned embedded picture (``caption`` is HTML)."""
    return f"<figure>{img_tag(png, alt)}<figcaption>{caption}</figcaption></figure>"


def missing(what: str, how: str) -> str:
    """One line naming a missing source and the command that makes it."""
    return f'<p class="missing">{esc(what)} &mdash; {esc(how)}</p>'


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path} cannot be read as JSON: {e}") from None


# ----------------------------------------------------------------------------- sources
def find_checkpoint(run: Path) -> Path | None:
    """``best.pt``, else ``last.pt``, else the newest ``*.pt`` in ``RUN/checkpoints``."""
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
    """The rows of ``RUN/metrics.jsonl`` (one per epoch), or [] when there is none.

    Raises:
        ReportError: a line is not JSON (named by number).
    """
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


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------- run facts
def epochs_trained(rows: list[dict], last: dict | None) -> int | None:
    """Whole epochs trained: the last complete epoch of metrics.jsonl, else ``last.pt``'s epoch (never best.pt)."""
    done = [r["epoch"] for r in rows if isinstance(r.get("epoch"), int) and not r.get("partial_epoch")]
    if done:
        return max(done)
    return (last or {}).get("epoch")


def best_epoch(rows: list[dict], last: dict | None, best: dict | None) -> int | None:
    """The epoch best.pt holds: recorded in last.pt's metrics, else best.pt's epoch."""
    recorded = ((last or {}).get("metrics") or {}).get("best_epoch")
    if isinstance(recorded, int):
        return recorded
    return (best or {}).get("epoch")


def total_seconds(rows: list[dict]) -> float | None:
    """Training wall time from metrics.jsonl: first to last epoch end, plus the first epoch (steps x step time)."""
    timed = [r for r in rows if _finite(r.get("time"))]
    if not timed:
        return None
    first = timed[0]
    first_epoch = (first.get("step") or 0) * (first.get("step_s") or 0.0)
    return float(timed[-1]["time"] - first["time"] + first_epoch)


def train_config(meta: dict | None):
    """The stored training configuration as a :class:`TrainConfig` (None when absent or unreadable)."""
    from hpc_dfs.config import ConfigError
    from hpc_dfs.config.train import TrainConfig
    cfg = (meta or {}).get("config")
    if not isinstance(cfg, dict):
        return None
    try:
        return TrainConfig.from_stored(cfg)   # sections, or the flat layout of older checkpoints
    except (ConfigError, TypeError):
        return None


def _report_time_env() -> dict[str, str]:
    """Versions and commit of the machine writing the report (labelled as such in the page)."""
    from importlib import metadata
    out = {}
    for pkg in ("torch", "horovod"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                                    capture_output=True, text=True, timeout=5).stdout.strip() or "not a git checkout"
    except (OSError, subprocess.SubprocessError):
        out["git"] = "git not available"
    return out


def environment_rows(meta: dict | None, pred_summary: dict | None) -> dict[str, str]:
    """torch, Horovod, device and git commit: recorded by train (``environment``), else named as not recorded."""
    env = (meta or {}).get("environment") or {}
    now = _report_time_env()
    out = {}
    for key, label, now_key in (("torch", "torch", "torch"), ("horovod", "Horovod", "horovod"),
                                ("git_commit", "git commit", "git")):
        rec = env.get(key)
        out[label] = str(rec) if rec else f"not recorded by train (report machine: {now[now_key]})"
    dev = env.get("device")
    pdev = (pred_summary or {}).get("device")
    out["device"] = (str(dev) if dev else "not recorded by train") + (f"; predict ran on {pdev}" if pdev else "")
    return out


def run_facts(ctx: dict) -> dict[str, Any]:
    """The run-facts table: what was trained, how long, on what, with which effective batch and LR."""
    last, best, rows, cfg = ctx["last"], ctx["best"], ctx["rows"], ctx["cfg"]
    meta = last or best or {}
    world = meta.get("world_size")
    n_ep, b_ep = ctx["epochs"], ctx["best_epoch"]
    facts: dict[str, Any] = {
        "epochs trained": f"{n_ep} of {cfg.schedule.epochs} configured" if cfg and n_ep is not None else n_ep,
        "best epoch (best.pt)": f"{b_ep} (by validation mean Dice)" if b_ep is not None else None,
        "optimizer steps": meta.get("step"), "ranks (world size)": world}
    if cfg and isinstance(world, int):
        gb = cfg.resolve_global_batch(world)
        facts["effective global batch"] = (f"{gb} (= {cfg.data.batch_size} per rank x {world} ranks"
                                           + (f" x {cfg.horovod.backward_passes_per_step} passes" if
                                              cfg.horovod.backward_passes_per_step > 1 else "") + ")"
                                           if not cfg.data.global_batch_size else f"{gb} (fixed)")
        facts["effective peak learning rate"] = (f"{num(cfg.optim.base_lr * cfg.lr_scale(world), 'lr')} (= "
                                                 f"{num(cfg.optim.base_lr, 'lr')} x {cfg.lr_scale(world):.3g}, "
                                                 f"{cfg.optim.lr_scaling} scaling)")
    secs = total_seconds(rows)
    if secs:
        facts["total training time"] = (f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.1f} min ({secs:.0f} s)") + \
            " (from metrics.jsonl: first to last epoch end, plus the first epoch's steps)"
    mc = meta.get("model_config") or {}
    facts["model"] = f"{mc.get('name')} ({meta.get('n_parameters') or (best or {}).get('n_parameters')} parameters)"
    facts.update(environment_rows(meta, ctx["pred_summary"]))
    facts["hpc-dfs version"] = meta.get("hpc_dfs_version")
    facts["checkpoints"] = ", ".join(str(p) for p in (ctx["last_path"], ctx["best_path"]) if p)
    return facts


def config_rows(cfg, model_config: dict, world: int | None) -> dict[str, Any]:
    """The training settings that apply to this run, zeros that mean "auto" spelled out."""
    if cfg is None:
        return {}
    rows: dict[str, Any] = {"optimizer": cfg.optim.optimizer,
                            "base learning rate (per batch_size)": num(cfg.optim.base_lr, "lr"),
                            "LR schedule": cfg.optim.lr_schedule, "warm-up epochs": f"{cfg.optim.warmup_epochs:g}",
                            "weight decay": f"{cfg.optim.weight_decay:g}"}
    if cfg.optim.optimizer == "sgd":
        rows["momentum"] = f"{cfg.optim.momentum} ({'Nesterov' if cfg.optim.nesterov else 'classical'})"
    if cfg.optim.lr_schedule == "plateau":
        rows["plateau factor / patience"] = f"{cfg.optim.plateau_factor} / {cfg.optim.plateau_patience} epochs"
    rows["batch per rank"] = cfg.data.batch_size
    rows["global batch"] = cfg.data.global_batch_size or (f"auto (batch x ranks = {cfg.resolve_global_batch(world)})"
                                                     if world else "auto (batch x ranks)")
    rows["steps per epoch"] = cfg.schedule.steps_per_epoch or "auto (one pass over the training slices)"
    rows["max steps"] = cfg.schedule.max_steps or "no limit"
    rows["tumour share of each batch (fg_fraction)"] = f"{cfg.data.fg_fraction:g}"
    rows["loss weights (Dice / CE / risk)"] = f"{cfg.loss.dice_weight} / {cfg.loss.ce_weight} / {cfg.loss.risk_weight}"
    rows["augmentation"] = "on" if cfg.data.augment else "off"
    rows["synchronised BatchNorm"] = cfg.horovod.sync_bn if model_config.get("norm", "batch") == "batch" else \
        f"n/a ({model_config.get('norm')} norm)"
    rows["gradient clip (global norm)"] = f"{cfg.optim.grad_clip:g}" if cfg.optim.grad_clip else "off"
    if cfg.horovod.compression != "none" or cfg.horovod.adasum:
        rows["Horovod"] = f"compression {cfg.horovod.compression}, adasum {cfg.horovod.adasum}"
    rows["validation fold / every"] = f"fold {cfg.schedule.val_fold}, every {cfg.schedule.val_every} epoch(s)"
    rows["seed"] = cfg.seed
    for k in ("name", "base_channels", "depth", "norm", "fusion", "n_clinical", "n_classes", "in_channels"):
        if k in model_config:
            rows[f"model: {k}"] = model_config[k]
    return rows


# ----------------------------------------------------------------------------- statistics for the warnings
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


# ----------------------------------------------------------------------------- warnings box
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
    if _finite(td) and td < TUMOR_DICE_WARN:
        low = [c["case_id"] for c in evaluation.get("cases", []) + evaluation.get("missing_cases", [])
               if _finite(c.get("tumor_dice")) and c["tumor_dice"] < TUMOR_DICE_WARN]
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
    if _finite(auc) and counts and min(counts) > 0:
        lo, hi = auc_ci_hanley(float(auc), *counts)
        if lo <= 0.5 <= hi:
            out.append(f"validation risk AUC {num(auc)} (95 % CI {lo:.2f}-{hi:.2f}, {counts[0]} malignant / "
                       f"{counts[1]} benign) is not distinguishable from chance (0.5)")
    elif vm.get("risk_acc") is not None and not _finite(auc):
        out.append("validation risk AUC is undefined (the validation cases have one class"
                   + (f": {counts[0]} malignant / {counts[1]} benign" if counts else "") + "); risk accuracy "
                   f"{num(vm.get('risk_acc'))} is then what a majority-class predictor gets")
    n_ep, b_ep = ctx["epochs"], ctx["best_epoch"]
    if isinstance(n_ep, int) and isinstance(b_ep, int) and n_ep != b_ep:
        out.append(f"best epoch {b_ep} differs from the last epoch trained ({n_ep}): best.pt (used by predict when "
                   "passed) is not the final model")
    return out


def warnings_box(lines: list[str]) -> str:
    """The warnings box at the top of the page (a green box when there is nothing to warn of)."""
    if not lines:
        return "<div class='ok'><h3>No warnings</h3><p>No tumour missed, and none of the checks below fired.</p></div>"
    items = "".join(f"<li>{esc(w)}</li>" for w in lines)
    return f"<div class='warnings' id='warnings'><h3>Warnings ({len(lines)})</h3><ul>{items}</ul></div>"


# ----------------------------------------------------------------------------- curves
def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["epoch"], float(r[key])) for r in rows if _finite(r.get(key)) and "epoch" in r]


def curves_png(rows: list[dict], best_ep: int | None = None, n_val: int | None = None,
               n_risk: int | None = None) -> bytes:
    """Loss, Dice, risk and learning rate per epoch from metrics.jsonl rows, the best epoch marked.

    Args:
        rows: metrics.jsonl rows.
        best_ep: epoch of best.pt (a dashed line in every panel).
        n_val: validation cases behind the Dice and validation loss; n_risk: cases with a risk label.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from hpc_dfs.visualize import figure_png
    nv = f" (validation n={n_val})" if n_val else ""
    nr = f" (validation n={n_risk if n_risk is not None else n_val})" if (n_risk or n_val) else ""
    panels = [(f"loss{nv}", [("train_loss", "train"), ("val_loss", "validation")], False),
              (f"Dice, 2D slices{nv}", [("kidney_dice", "kidney"), ("tumor_dice", "tumour")], False),
              (f"risk{nr}", [("risk_auc", "AUC"), ("risk_acc", "accuracy")], False),
              ("learning rate (effective)", [("lr", "lr")], True)]
    fig = Figure(figsize=(16, 3.8), dpi=80)
    axes = fig.subplots(1, 4)
    for ax, (name, keys, log_y) in zip(axes, panels):
        for key, label in keys:
            pts = _series(rows, key)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        if best_ep is not None:
            ax.axvline(best_ep, color="#c60", ls="--", lw=1, label=f"best epoch {best_ep}")
        if name.startswith("risk"):
            ax.axhline(0.5, color="#888", ls=":", lw=1, label="chance (AUC 0.5)")
        lr = [v for _, v in _series(rows, "lr") if v > 0]
        if log_y and lr and max(lr) > 10 * min(lr):  # a log axis only when the schedule spans a decade
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


METRIC_COLUMNS = (("epoch", "epoch", "int"), ("train_loss", "train loss", "loss"), ("val_loss", "val loss", "loss"),
                  ("kidney_dice", "val kidney Dice", "dice"), ("tumor_dice", "val tumour Dice", "dice"),
                  ("risk_auc", "val risk AUC", "dice"), ("risk_acc", "val risk accuracy", "dice"),
                  ("lr", "lr", "lr"), ("samples_per_s", "samples/s", "s"), ("allreduce_frac", "allreduce share",
                                                                             "dice"))


def section_curves(run: Path, rows: list[dict], ctx: dict, title: str = "Training curves") -> str:
    """Loss, Dice, risk and LR per epoch (best epoch marked) and every epoch's metrics in a table."""
    out = [f"<h2>{esc(title)}</h2>"]
    n_val = (((ctx["last"] or ctx["best"] or {}).get("metrics")) or {}).get("n_val_cases")
    counts = val_risk_counts(ctx["manifest"], ctx["cfg"])
    if rows:
        png = curves_png(rows, ctx["best_epoch"], n_val, sum(counts) if counts else None)
        out.append(figure(png, "training curves (rendered from metrics.jsonl)",
                          f"Training curves rendered from metrics.jsonl: {len(rows)} epochs; dashed line = best "
                          f"epoch ({esc(ctx['best_epoch'])}); validation over {esc(n_val)} case(s)."))
    elif (run / "curves.png").is_file():
        out.append(figure((run / "curves.png").read_bytes(), "training curves", "RUN/curves.png (no metrics.jsonl)"))
    else:
        return out[0] + missing(f"no {run / 'metrics.jsonl'}", "written by `hpc-dfs train` after every epoch")
    keys = [c for c in METRIC_COLUMNS if any(c[0] in r for r in rows)]
    body = [[num(r.get(k), kind) if k != "epoch" else esc(r.get(k)) for k, _, kind in keys] for r in rows]
    best = ctx["best_epoch"]
    html_rows = "".join(("<tr class='best'>" if r.get("epoch") == best else "<tr>") + "".join(
        f"<td>{c}</td>" for c in b) + "</tr>" for r, b in zip(rows, body))
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in keys)
    if rows:
        out += [f"<details><summary>metrics.jsonl: every epoch ({len(rows)}; the best one highlighted)</summary>",
                f"<table><thead><tr>{head}</tr></thead><tbody>{html_rows}</tbody></table></details>"]
    return "\n".join(out)


def section_validation(ctx: dict, title: str = "Validation metrics") -> str:
    """Validation metrics of the best and the last epoch, each with its n."""
    out = [f"<h2>{esc(title)}</h2>"]
    last_m = ((ctx["last"] or {}).get("metrics")) or {}
    best_m = ((ctx["best"] or {}).get("metrics")) or {}
    if not (last_m or best_m):
        return out[0] + missing("no validation metrics",
                                "they come from `hpc-dfs train` (checkpoint and metrics.jsonl)")
    counts = val_risk_counts(ctx["manifest"], ctx["cfg"])
    n_val = last_m.get("n_val_cases", best_m.get("n_val_cases"))
    n_risk = f"n={sum(counts)} ({counts[0]} malignant / {counts[1]} benign)" if counts else f"n={n_val}"
    rows = [("kidney Dice (2D slices)", f"n={n_val}", "kidney_dice"), ("tumour Dice (2D slices)", f"n={n_val}",
                                                                       "tumor_dice"),
            ("validation loss", f"n={n_val}", "val_loss"), ("risk AUC (malignant)", n_risk, "risk_auc"),
            ("risk accuracy (malignant at P >= 0.5)", n_risk, "risk_acc")]
    out.append(table(["metric", "cases", f"best epoch ({ctx['best_epoch']})", f"last epoch ({ctx['epochs']})"],
                     [[name, n, num(best_m.get(k), "loss" if "loss" in k else "dice"),
                       num(last_m.get(k), "loss" if "loss" in k else "dice")] for name, n, k in rows]))
    out.append("<p class='note'>Validation Dice is computed on the validation fold's 2D slices at the training "
               "resolution, pooled per case, before post-processing; the test Dice under Evaluation is in 3D at "
               "the native resolution after post-processing, on other cases. They are not expected to agree, "
               "least of all for small tumours.</p>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- run and data
def section_run(ctx: dict) -> str:
    """Run facts and the configuration that applies to the run."""
    meta = ctx["last"] or ctx["best"]
    if meta is None:
        return "<h2>Run</h2>" + missing(f"no checkpoint in {ctx['run'] / 'checkpoints'}",
                                        "run `hpc-dfs train --out RUN` first")
    out = ["<h2>Run</h2>", kv_table(run_facts(ctx), "facts")]
    rows = config_rows(ctx["cfg"], meta.get("model_config") or {}, meta.get("world_size"))
    if rows:
        out += ["<h3>Configuration (what applies to this run)</h3>", kv_table(rows)]
    elif (ctx["run"] / "config.toml").is_file():
        out += ["<details open><summary>config.toml</summary><pre>", esc((ctx["run"] / "config.toml").read_text()),
                "</pre></details>"]
    return "\n".join(out)


def _split_counts(manifest: dict, cfg, evaluation: dict | None) -> dict[str, Any]:
    cases = manifest.get("cases", [])
    folds: dict = {}
    for c in cases:
        folds[c.get("fold")] = folds.get(c.get("fold"), 0) + 1
    risk = [c.get("risk_label") for c in cases]
    out: dict[str, Any] = {"cases": len(cases), "cases per fold": dict(sorted(folds.items(), key=str))}
    if cfg is not None:
        n_val = folds.get(cfg.schedule.val_fold, 0)
        out["train / validation cases"] = f"{len(cases) - n_val} / {n_val} (fold {cfg.schedule.val_fold})"
    if evaluation:
        m = evaluation.get("mean_all") or evaluation.get("mean") or {}
        out["test cases (evaluated)"] = m.get("n_cases")
    out["malignant / benign / unknown"] = f"{risk.count(1)} / {risk.count(0)} / {sum(r not in (0, 1) for r in risk)}"
    out["slices"] = sum(c.get("n_slices", 0) for c in cases)
    out["slices with kidney"] = sum((c.get("slices_with") or {}).get("kidney", 0) for c in cases)
    out["slices with tumour"] = sum((c.get("slices_with") or {}).get("tumor", 0) for c in cases)
    return out


def feature_sets(meta: dict | None, clin_metrics: dict | None) -> str:
    """One list of clinical feature names, saying which model uses which."""
    fusion = list(((meta or {}).get("clinical") or {}).get("feature_names") or [])
    clinical = list((clin_metrics or {}).get("feature_names") or [])
    if not fusion and not clinical:
        return ""
    names = list(dict.fromkeys(fusion + clinical))
    only_f = [n for n in fusion if n not in clinical]
    only_c = [n for n in clinical if n not in fusion]
    text = f"<p>{len(names)} clinical feature names in all"
    detail = ""
    if fusion and clinical:
        text += (f": the fusion model uses {len(fusion)}, the clinical model {len(clinical)}, "
                 f"{len(fusion) - len(only_f)} of them shared (the others differ in name or encoding)")
        detail = "".join(f"<p>only the {who}: <code>{esc(', '.join(ns))}</code></p>"
                         for who, ns in (("fusion model", only_f), ("clinical model", only_c)) if ns)
    text += (f".</p><details><summary>feature names</summary><p><code>{esc(', '.join(names))}</code></p>"
             f"{detail}</details>")
    return text


def section_data(ctx: dict) -> str:
    """Case counts and split (``--shards``), preprocessing, fingerprint and the clinical features."""
    meta, manifest, shards = ctx["best"] or ctx["last"], ctx["manifest"], ctx["shards"]
    out = ["<h2>Data</h2>"]
    if meta and meta.get("preprocessing"):
        out += ["<details><summary>preprocessing stored with the model (predict reproduces it exactly)</summary>",
                kv_table(flatten_numbers(meta["preprocessing"])), "</details>"]
    if manifest:
        out += [f"<p>Shards <code>{esc(shards)}</code>:</p>", kv_table(_split_counts(manifest, ctx["cfg"],
                                                                                     ctx["evaluation"]))]
        fp = manifest.get("fingerprint")
        if isinstance(fp, dict):
            out += ["<details><summary>dataset fingerprint</summary>", kv_table(flatten_numbers(fp)), "</details>"]
    elif not meta:
        out.append(missing("no checkpoint and no manifest", "pass --shards SHARDS or train a model"))
    else:
        out.append('<p class="note">Pass <code>--shards SHARDS</code> for case counts, folds and the fingerprint.</p>')
    out.append(feature_sets(meta, ctx["clin_metrics"]))
    return "\n".join(out)


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


# ----------------------------------------------------------------------------- evaluation
RANK_METRIC = ("tumor_dice", "tumour Dice")


def ranked_cases(evaluation: dict) -> list[dict]:
    """Every case (missing predictions included), worst first by tumour Dice, then kidney Dice, then case id."""
    cases = list(evaluation.get("cases", [])) + list(evaluation.get("missing_cases", []))
    return sorted(cases, key=lambda c: (c.get(RANK_METRIC[0]) if _finite(c.get(RANK_METRIC[0])) else -1.0,
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


def case_overlay(case_id: str, evaluation: dict, pred_dir: Path | None) -> tuple[bytes | None, str]:
    """Ground truth, prediction and errors over the CT (rendered fresh), else PRED's overlay PNG; and its source."""
    import nibabel as nib

    from hpc_dfs.stages.evaluate import GT_NAMES
    from hpc_dfs.visualize import case_figure, figure_png
    sfx = case_id.split("_", 1)[1] if case_id.startswith("case_") else case_id
    gt_dir = Path(evaluation.get("gt_dir", "")) / case_id
    pdir = Path(evaluation["pred_dir"]) if evaluation.get("pred_dir") else pred_dir
    try:
        gt_path = next((gt_dir / n for n in GT_NAMES if (gt_dir / n).exists()), None)
        img_path = gt_dir / "imaging.nii.gz"
        pred_path = (pdir / f"prediction_{sfx}.nii.gz") if pdir else None
        if gt_path and img_path.exists():
            img = nib.load(str(img_path))
            gt = np.asanyarray(nib.load(str(gt_path)).dataobj)
            pred = (np.asanyarray(nib.load(str(pred_path)).dataobj) if pred_path and pred_path.exists()
                    else np.zeros_like(gt))
            fig = case_figure(np.asanyarray(img.dataobj), pred, img.affine, gt=gt, title=case_id)
            return figure_png(fig), "rendered"
    except Exception as e:  # a picture must not stop the report
        log.warning("%s: cannot render the overlay (%s); using the predict overlay if any", case_id, e)
    for d in (pdir, pred_dir):
        if d and (d / f"overlay_{sfx}.png").is_file():
            return (d / f"overlay_{sfx}.png").read_bytes(), "predict"
    return None, ""


def overlay_choice(ranked: list[dict], limit: int = MAX_OVERLAYS) -> list[tuple[str, dict]]:
    """(tag, case): all cases when few, else the worst and the best half of ``limit`` each."""
    n = len(ranked)
    if n <= limit:
        return [("worst" if i == 0 else "best" if i == n - 1 else f"rank {i + 1} of {n}", c)
                for i, c in enumerate(ranked)]
    k = limit // 2
    return [("worst" if i == 0 else f"rank {i + 1} of {n}", c) for i, c in enumerate(ranked[:k])] + \
        [("best" if j == n - 1 else f"rank {j + 1} of {n}", ranked[j]) for j in range(n - k, n)]


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


# ----------------------------------------------------------------------------- prediction
def truth_labels(evaluation: dict | None, summary: dict) -> dict[str, Any]:
    """case id -> ``malignant`` from the test data's kits.json (evaluation's ground truth, else beside the images)."""
    candidates = []
    if evaluation and evaluation.get("gt_dir"):
        candidates.append(Path(evaluation["gt_dir"]) / "kits.json")
    for c in summary.get("cases", [])[:1]:
        if c.get("image"):
            candidates.append(Path(c["image"]).parent.parent / "kits.json")
    for p in candidates:
        if p.is_file():
            try:
                recs = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(recs, list):
                return {r.get("case_id"): r.get("malignant") for r in recs if isinstance(r, dict)}
    return {}


def section_prediction(pred: Path | None, evaluation: dict | None) -> str:
    """Prediction summary; per case volumes, P(malignant) and the true label."""
    out = ["<h2>Prediction</h2>"]
    if pred is None or not (pred / "summary.json").is_file():
        return out[0] + missing("no prediction summary",
                                "run `hpc-dfs predict --checkpoint CKPT --input DATA --out PRED` and pass --pred PRED")
    s = _read_json(pred / "summary.json")
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


# ----------------------------------------------------------------------------- clinical
def read_oof(clin: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """model -> (y_true, y_prob) of CLIN/predictions.csv (empty when absent or unreadable)."""
    p = clin / "predictions.csv"
    if not p.is_file():
        return {}
    out: dict[str, tuple[list, list]] = {}
    try:
        with p.open() as f:
            for r in csv.DictReader(f):
                ys, ps = out.setdefault(r["model"], ([], []))
                ys.append(int(float(r["y_true"])))
                ps.append(float(r["y_prob"]))
    except (OSError, KeyError, ValueError) as e:
        log.warning("%s cannot be read (%s); no ROC or calibration plot", p, e)
        return {}
    return {m: (np.asarray(y), np.asarray(pr)) for m, (y, pr) in out.items()}


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


def roc_png(oof: dict, stats: dict, positive: str) -> bytes:
    """ROC of every model with the chance diagonal and the majority-class predictor's point."""
    from sklearn.metrics import roc_curve

    from hpc_dfs.visualize import plot_png

    def draw(ax):
        for m, (y, p) in oof.items():
            if m in stats:
                fpr, tpr, _ = roc_curve(y, p)
                lo, hi = stats[m]["ci"] or (math.nan, math.nan)
                ax.plot(fpr, tpr, label=f"{stats[m]['label']}: AUC {stats[m]['auc']:.2f} (95% CI {lo:.2f}-{hi:.2f})")
        ax.plot([0, 1], [0, 1], ":", color="#888", label="chance (AUC 0.5)")
        y = next(iter(oof.values()))[0]
        maj = int(np.mean(y) >= 0.5)
        ax.plot([maj], [maj], "s", color="#c60", ms=8,
                label=f"majority class ({'all ' + positive if maj else 'none ' + positive}), AUC 0.5")
        ax.set_xlabel("false-positive rate (1 - specificity)")
        ax.set_ylabel(f"true-positive rate (sensitivity for {positive})")
        ax.set_title(f"ROC, out-of-fold, positive class = {positive}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    return plot_png(draw, figsize=(6, 5))


def calibration_png(oof: dict, labels: dict, positive: str, bins: int = 5) -> bytes:
    """Reliability diagram: observed share of ``positive`` per bin of predicted probability, per model."""
    from hpc_dfs.visualize import plot_png
    edges = np.linspace(0, 1, bins + 1)

    def draw(ax):
        for m, (y, p) in oof.items():
            idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
            pts = [(float(p[idx == b].mean()), float(y[idx == b].mean()), int((idx == b).sum())) for b in range(bins)
                   if (idx == b).any()]
            if pts:
                xs, ys, ns = zip(*pts)
                ax.plot(xs, ys, marker="o", label=f"{labels.get(m, m)} (n per bin {', '.join(map(str, ns))})")
        ax.plot([0, 1], [0, 1], ":", color="#888", label="perfect calibration")
        ax.set_xlabel(f"predicted P({positive})")
        ax.set_ylabel(f"observed share {positive}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title("calibration (reliability), out-of-fold", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    return plot_png(draw, figsize=(6, 5))


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


def clinical_warnings(stats: dict, positive: str) -> list[str]:
    """Warnings for clinical AUCs whose interval contains 0.5, and for SHAP of such a GRU."""
    out = [f"clinical {s['label']}: AUC {s['auc']:.2f} for {positive} (95 % CI {s['ci'][0]:.2f}-{s['ci'][1]:.2f}, "
           f"n={s['n']}) is not distinguishable from chance (0.5)" for s in stats.values() if s["chance"]]
    gru = stats.get("gru")
    if gru and gru["chance"]:
        out.append("the SHAP pictures explain the Clinical-GRU, a model no better than chance here: they describe "
                   "what that model does, not what predicts malignancy")
    return out


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


# ----------------------------------------------------------------------------- assembly
def _default_eval(run: Path, pred: Path | None) -> Path | None:
    for cand in ([pred.parent / "eval.json", pred / "eval.json"] if pred else []) + [run / "eval.json"]:
        if cand.is_file():
            return cand
    return None


def _load_clinical(clin: Path | None) -> tuple[dict | None, dict, dict, str]:
    if clin is None or not (clin / "metrics.json").is_file():
        return None, {}, {}, ""
    metrics = _read_json(clin / "metrics.json")
    if not isinstance(metrics, dict):
        return None, {}, {}, ""
    labels = {m: (v or {}).get("label", m) for m, v in (metrics.get("models") or {}).items() if isinstance(v, dict)}
    oof = read_oof(clin)
    positive = ((metrics.get("data") or {}) if isinstance(metrics.get("data"), dict) else {}).get("positive_class")
    return metrics, oof, clinical_stats(oof, labels), positive or "the positive class"


def gather(run: Path, pred: Path | None, eval_path: Path | None, clin: Path | None, shards: Path | None) -> dict:
    """Every source of the report, read once: checkpoints, metrics, evaluation, shards, prediction, clinical.

    Raises:
        ReportError: the run folder is missing or a source is not what its stage writes.
    """
    run = Path(run)
    if not run.is_dir():
        raise ReportError(f"run folder {run} does not exist")
    ckdir = run / "checkpoints"
    last_path = ckdir / "last.pt" if (ckdir / "last.pt").is_file() else None
    best_path = find_checkpoint(run)
    best = load_checkpoint_meta(best_path) if best_path else None
    last = (best if last_path == best_path else load_checkpoint_meta(last_path)) if last_path else None
    pred = pred if pred is not None else (run / "pred" if (run / "pred").is_dir() else None)
    eval_path = eval_path or _default_eval(run, pred)
    evaluation = _read_json(eval_path) if eval_path else None
    if eval_path and not isinstance(evaluation, dict):
        raise ReportError(f"{eval_path} is not an `hpc-dfs evaluate` JSON")
    meta = last or best or {}
    if shards is None and isinstance(meta.get("config"), dict) and meta["config"].get("shards"):
        shards = Path(meta["config"]["shards"])
    manifest = _read_json(shards / "manifest.json") if shards and (shards / "manifest.json").is_file() else None
    rows = read_metrics(run)
    clin_metrics, oof, stats, positive = _load_clinical(clin)
    ctx = {"run": run, "pred": pred, "eval_path": eval_path, "evaluation": evaluation, "shards": shards,
           "manifest": manifest, "rows": rows, "last": last, "best": best, "last_path": last_path,
           "best_path": best_path, "cfg": train_config(meta), "clin": clin, "clin_metrics": clin_metrics,
           "clin_oof": oof, "clin_stats": stats, "clin_positive": positive,
           "pred_summary": _read_json(pred / "summary.json") if pred and (pred / "summary.json").is_file() else None}
    ctx["epochs"] = epochs_trained(rows, last)
    ctx["best_epoch"] = best_epoch(rows, last, best)
    return ctx


def run_label(run: Path) -> str:
    """``parent/run`` (a run folder is often just called "run")."""
    r = run.resolve()
    return f"{r.parent.name}/{r.name}" if r.parent.name else r.name


def headline(ctx: dict) -> str:
    """One sentence: the test score with its n and detection count, the model and how long it was trained."""
    parts = []
    ev = ctx["evaluation"] or {}
    m = ev.get("mean_all") if (ev.get("mean_all") or {}).get("n_missing") else ev.get("mean")
    if m and m.get("kits_score") is not None:
        det = ""
        if "n_tumors_gt" in m:
            det = (f"; tumours: {m['n_tumors_hit']} of {m['n_tumors_gt']} hit, {m['n_tumors_missed']} missed, "
                   f"{m['n_tumors_wrong_kidney']} in the wrong kidney")
        parts.append(f"Test: KiTS19 score <b>{num(m['kits_score'])}</b> (kidney Dice {num(m['kidney_dice'])}, tumour "
                     f"Dice {num(m['tumor_dice'])}) on n={esc(m['n_cases'])} cases{esc(det)}")
    meta = ctx["last"] or ctx["best"]
    if meta:
        parts.append(f"model {esc((meta.get('model_config') or {}).get('name'))} trained for "
                     f"<b>{esc(ctx['epochs'])} epochs</b> (best epoch {esc(ctx['best_epoch'])}) on "
                     f"{esc(meta.get('world_size'))} rank(s)")
    return f"<p>{'; '.join(parts)}.</p>" if parts else ""


def cascade_stages(run: Path) -> dict[str, Path] | None:
    """``{"locate": RUN/locate, "refine": RUN/refine}`` for a ``train --stage both`` folder, else None.

    Args:
        run: the folder given to ``hpc-dfs report``.
    """
    stages = {s: Path(run) / s for s in ("locate", "refine")}
    if (Path(run) / "checkpoints").is_dir() or not all((p / "checkpoints").is_dir() for p in stages.values()):
        return None
    return stages


def gather_cascade(run: Path, pred: Path | None, eval_path: Path | None, clin: Path | None,
                   shards: Path | None) -> tuple[dict, dict | None]:
    """(context of the run, or of stage 2 for a cascade folder; context of stage 1 or None), see :func:`gather`.

    For a ``--stage both`` folder the predictions and evaluation default to ``RUN/pred`` and ``RUN/eval.json``
    (beside both stages), stage 2 (``refine``) carries the run's configuration and stage 1 (``locate``) adds
    its own curves, validation metrics and warnings.

    Raises:
        ReportError: the run folder is missing or a source cannot be read.
    """
    stages = cascade_stages(run)
    if stages is None:
        return gather(run, pred, eval_path, clin, shards), None
    pred = pred if pred is not None else (run / "pred" if (run / "pred").is_dir() else None)
    eval_path = eval_path or _default_eval(run, pred)
    return (gather(stages["refine"], pred, eval_path, clin, shards),
            gather(stages["locate"], None, None, None, shards))


def _title(ctx: dict, ctx1: dict | None, run: Path) -> str:
    meta = ctx["last"] or ctx["best"] or {}
    model = (meta.get("model_config") or {}).get("name") or "no model"
    if ctx1 is None:
        return f"Kidney-tumour segmentation: {model}, {ctx['epochs']} epochs ({run_label(ctx['run'])})"
    return (f"Kidney-tumour segmentation: {model} cascade, stage 1 (locate) {ctx1['epochs']} + stage 2 (refine) "
            f"{ctx['epochs']} epochs ({run_label(Path(run))})")


def _stage_sections(ctx: dict, ctx1: dict | None) -> list[str]:
    """Curves and validation metrics: of the run, or of both cascade stages (stage 1 first)."""
    if ctx1 is None:
        return [section_curves(ctx["run"], ctx["rows"], ctx), section_validation(ctx)]
    return [section_curves(ctx1["run"], ctx1["rows"], ctx1, "Stage 1 (locate: whole slices): training curves"),
            section_validation(ctx1, "Stage 1 (locate): validation metrics"),
            section_curves(ctx["run"], ctx["rows"], ctx, "Stage 2 (refine: kidney windows): training curves"),
            section_validation(ctx, "Stage 2 (refine): validation metrics")]


def build_report(run: Path, pred: Path | None = None, eval_path: Path | None = None, clin: Path | None = None,
                 shards: Path | None = None) -> str:
    """The report's HTML text (one self-contained page).

    Args:
        run: the run folder written by ``hpc-dfs train``; for ``--stage both`` the folder holding
            ``locate/`` and ``refine/`` (both stages are reported).
        pred, eval_path, clin, shards: the other stages' outputs (defaults in the module docstring).

    Raises:
        ReportError: the run folder is missing or a source cannot be read.
    """
    ctx, ctx1 = gather_cascade(Path(run), pred, eval_path, clin, shards)
    title = _title(ctx, ctx1, Path(run))
    stage1 = [] if ctx1 is None else [f"stage 1 (locate): {w}" for w in training_warnings(ctx1)]
    warnings = (detection_warnings(ctx["evaluation"]) + evaluation_warnings(ctx["evaluation"])
                + stage1 + training_warnings(ctx) + clinical_warnings(ctx["clin_stats"], ctx["clin_positive"]))
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{esc(title)}</h1>",
            f"<p class='note'>Generated {created} by hpc-dfs {__version__} from <code>{esc(run)}</code>.</p>",
            headline(ctx), warnings_box(warnings), section_run(ctx), section_data(ctx), *_stage_sections(ctx, ctx1),
            section_evaluation(ctx["evaluation"], ctx["eval_path"]), section_overlays(ctx["evaluation"], ctx["pred"]),
            section_prediction(ctx["pred"], ctx["evaluation"]), section_clinical(ctx["clin"], ctx)]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's arguments: the run folder and the other stages' outputs (``type=Path``)."""
    parser.add_argument("run", type=Path, help="run folder written by `hpc-dfs train` (RUN)")
    parser.add_argument("--pred", type=Path, default=None, help="predictions folder (default RUN/pred)")
    parser.add_argument("--eval", dest="eval_path", type=Path, default=None,
                        help="evaluation JSON (default PRED/../eval.json or RUN/eval.json)")
    parser.add_argument("--clinical", type=Path, default=None, help="output folder of `hpc-dfs clinical` (CLIN)")
    parser.add_argument("--shards", type=Path, default=None, help="shards folder, for case counts and the split")
    parser.add_argument("--out", type=Path, default=None, help="HTML file to write (default RUN/report.html)")


def main(args: argparse.Namespace) -> int:
    """``hpc-dfs report``: write the HTML page.

    Raises:
        HpcDfsError: a folder or file argument does not exist, or a source cannot be read (code 2).
    """
    try:
        require_path(args.run, "dir", "run folder")
    except HpcDfsError as e:
        raise ReportError(str(e)) from None
    for flag, p, kind in (("--pred", args.pred, "dir"), ("--eval", args.eval_path, "file"),
                          ("--clinical", args.clinical, "dir"), ("--shards", args.shards, "dir")):
        if p is not None:
            require_path(p, kind, flag)
    text = build_report(args.run, args.pred, args.eval_path, args.clinical, args.shards)
    out = args.out or Path(args.run) / "report.html"
    fsutil.write_text(out, text)
    log.info("wrote %s (%.1f kB)", out, len(text) / 1024)
    return 0
