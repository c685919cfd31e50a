"""Every source of the report, read once and only through the contracts: run, checkpoints, shards, PRED, eval."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from hpc_dfs.contracts import checkpoint as ckpt_contract, run as run_contract
from hpc_dfs.contracts.evaluation import default_eval_path
from hpc_dfs.contracts.kits import CLINICAL_NAME
from hpc_dfs.contracts.prediction import SUMMARY_NAME
from hpc_dfs.contracts.shards import manifest_path
from hpc_dfs.errors import EXIT_USAGE, HpcDfsError
from hpc_dfs.log import get_logger
from hpc_dfs.report.stats import clinical_stats, finite

__all__ = ["ReportError", "read_json", "find_checkpoint", "load_checkpoint_meta", "read_metrics", "total_seconds",
           "train_config", "report_time_env", "gather", "cascade_stages", "gather_cascade", "read_oof",
           "truth_labels", "run_label"]

log = get_logger("hpc_dfs.report")


class ReportError(HpcDfsError, ValueError):
    """The run folder cannot be reported on (named in the message)."""

    code = EXIT_USAGE


def read_json(path: Path) -> Any:
    """The JSON content of ``path``.

    Args:
        path: a JSON file written by a stage.

    Raises:
        ReportError: the file cannot be read as JSON (named).
    """
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path} cannot be read as JSON: {e}") from None


def _optional_json(path: Path) -> Any:
    """:func:`read_json` of ``path``, or None when there is no such file."""
    return read_json(path) if path.is_file() else None


def _run_info(run: Path) -> dict | None:
    """``RUN/run.json`` (what ran), or None for a run written before train recorded it."""
    try:
        return run_contract.read_run_info(run)
    except run_contract.RunFolderError as e:
        raise ReportError(str(e)) from None


def find_checkpoint(run: Path) -> Path | None:
    """``best.pt``, else ``last.pt``, else the newest ``*.pt`` in ``RUN/checkpoints``."""
    for path in (ckpt_contract.best_path(run), ckpt_contract.last_path(run)):
        if path.is_file():
            return path
    ckdir = ckpt_contract.checkpoint_dir(run)
    pts = sorted(ckdir.glob("*.pt")) if ckdir.is_dir() else []
    return pts[-1] if pts else None


def load_checkpoint_meta(path: Path) -> dict:
    """Everything of a checkpoint except the tensors (model, optimizer, RNG states), read through the schema."""
    try:
        return ckpt_contract.read_meta(path)
    except ckpt_contract.CheckpointError as e:
        raise ReportError(str(e)) from None


def read_metrics(run: Path) -> list[dict]:
    """The rows of ``RUN/metrics.jsonl`` (one per epoch), or [] when there is none.

    Raises:
        ReportError: a line is not JSON (named by number).
    """
    try:
        return run_contract.read_metrics(run)
    except run_contract.RunFolderError as e:
        raise ReportError(str(e)) from None


def total_seconds(rows: list[dict]) -> float | None:
    """Training wall time from metrics.jsonl: first to last epoch end, plus the first epoch (steps x step time)."""
    timed = [r for r in rows if finite(r.get("time"))]
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


def report_time_env() -> dict[str, str]:
    """Versions and commit of the machine writing the report (labelled as such in the page)."""
    out = {pkg: run_contract.package_version(pkg) or "not installed" for pkg in ("torch", "horovod")}
    out["git"] = run_contract.git_commit(short=True) or "not a git checkout (or no git)"
    return out


def gather(run: Path, pred: Path | None, eval_path: Path | None, clin: Path | None, shards: Path | None) -> dict:
    """Every source of the report, read once: checkpoints, metrics, evaluation, shards, prediction, clinical.

    Raises:
        ReportError: the run folder is missing or a source is not what its stage writes.
    """
    run = Path(run)
    if not run.is_dir():
        raise ReportError(f"run folder {run} does not exist")
    last_path = ckpt_contract.last_path(run) if ckpt_contract.last_path(run).is_file() else None
    best_path = find_checkpoint(run)
    best = load_checkpoint_meta(best_path) if best_path else None
    last = (best if last_path == best_path else load_checkpoint_meta(last_path)) if last_path else None
    pred = pred if pred is not None else (run / "pred" if (run / "pred").is_dir() else None)
    eval_path = eval_path or default_eval_path(run, pred)
    evaluation = read_json(eval_path) if eval_path else None
    if eval_path and not isinstance(evaluation, dict):
        raise ReportError(f"{eval_path} is not an `hpc-dfs evaluate` JSON")
    meta = last or best or {}
    if shards is None and isinstance(meta.get("config"), dict) and meta["config"].get("shards"):
        shards = Path(meta["config"]["shards"])
    manifest = _optional_json(manifest_path(shards)) if shards else None
    rows = read_metrics(run)
    clin_metrics, oof, stats, positive = _load_clinical(clin)
    ctx = {"run": run, "pred": pred, "eval_path": eval_path, "evaluation": evaluation, "shards": shards,
           "manifest": manifest, "rows": rows, "last": last, "best": best, "last_path": last_path,
           "best_path": best_path, "cfg": train_config(meta), "clin": clin, "clin_metrics": clin_metrics,
           "clin_oof": oof, "clin_stats": stats, "clin_positive": positive,
           "pred_summary": _optional_json(pred / SUMMARY_NAME) if pred else None, "run_info": _run_info(run)}
    ctx["epochs"] = run_contract.epochs_trained(rows, last)
    ctx["best_epoch"] = run_contract.best_epoch(rows, last, best)
    return ctx


def cascade_stages(run: Path) -> dict[str, Path] | None:
    """``{"locate": RUN/locate, "refine": RUN/refine}`` for a ``train --stage both`` folder, else None.

    Args:
        run: the folder given to ``hpc-dfs report``.
    """
    stages = run_contract.stage_dirs(run)
    if ckpt_contract.checkpoint_dir(run).is_dir() or not all(ckpt_contract.checkpoint_dir(p).is_dir()
                                                              for p in stages.values()):
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
    eval_path = eval_path or default_eval_path(run, pred)
    return (gather(stages["refine"], pred, eval_path, clin, shards),
            gather(stages["locate"], None, None, None, shards))


def _load_clinical(clin: Path | None) -> tuple[dict | None, dict, dict, str]:
    if clin is None or not (clin / "metrics.json").is_file():
        return None, {}, {}, ""
    metrics = read_json(clin / "metrics.json")
    if not isinstance(metrics, dict):
        return None, {}, {}, ""
    labels = {m: (v or {}).get("label", m) for m, v in (metrics.get("models") or {}).items() if isinstance(v, dict)}
    oof = read_oof(clin)
    positive = ((metrics.get("data") or {}) if isinstance(metrics.get("data"), dict) else {}).get("positive_class")
    return metrics, oof, clinical_stats(oof, labels), positive or "the positive class"


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


def truth_labels(evaluation: dict | None, summary: dict) -> dict[str, Any]:
    """case id -> ``malignant`` from the test data's kits.json (evaluation's ground truth, else beside the images)."""
    candidates = []
    if evaluation and evaluation.get("gt_dir"):
        candidates.append(Path(evaluation["gt_dir"]) / CLINICAL_NAME)
    for c in summary.get("cases", [])[:1]:
        if c.get("image"):
            candidates.append(Path(c["image"]).parent.parent / CLINICAL_NAME)
    for p in candidates:
        if p.is_file():
            try:
                recs = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(recs, list):
                return {r.get("case_id"): r.get("malignant") for r in recs if isinstance(r, dict)}
    return {}


def run_label(run: Path) -> str:
    """``parent/run`` (a run folder is often just called "run")."""
    r = run.resolve()
    return f"{r.parent.name}/{r.name}" if r.parent.name else r.name
