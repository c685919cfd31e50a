"""The whole page: title, headline, warnings and every section, for one run, both stages of a cascade, or the folds
of a cross-validation run."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from hpc_dfs import __version__
from hpc_dfs.contracts import run as run_contract
from hpc_dfs.contracts.evaluation import default_eval_path
from hpc_dfs.report.checks import clinical_warnings, detection_warnings, evaluation_warnings, training_warnings
from hpc_dfs.report.html import esc, page, warnings_box
from hpc_dfs.report.sections_results import section_clinical, section_evaluation, section_overlays, section_prediction
from hpc_dfs.report.sections_run import headline, section_curves, section_data, section_run, section_validation
from hpc_dfs.report.sections_cv import cv_context, cv_warnings, first_fold_run, section_cv
from hpc_dfs.report.sources import gather_cascade, run_label

__all__ = ["build_report"]


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
            ``locate/`` and ``refine/`` (both stages are reported); for ``--folds`` the folder holding ``fold_K/``
            (every fold's figures, the pooled out-of-fold evaluation, and the first fold's settings and curves).
        pred, eval_path, clin, shards: the other stages' outputs (defaults in the module docstring).

    Raises:
        ReportError: the run folder is missing or a source cannot be read.
    """
    run = Path(run)
    folds = first_fold_run(run) if run_contract.is_cv_run(run) else None
    if folds:   # a cross-validation run: the first fold's settings, data and curves; every fold's figures
        pred = pred if pred is not None else (run / "pred" if (run / "pred").is_dir() else None)
        eval_path = eval_path or default_eval_path(run, pred)
    ctx, ctx1 = gather_cascade(folds or run, pred, eval_path, clin, shards)
    cv = cv_context(run, ctx["evaluation"], ctx["eval_path"]) if folds else None
    title = _title(ctx, ctx1, run)
    if cv is not None:
        model = ((ctx["last"] or ctx["best"] or {}).get("model_config") or {}).get("name") or "no model"
        title = (f"Kidney-tumour segmentation: {model}, {cv['summary']['n_folds']}-fold cross-validation "
                 f"({run_label(run)}; configuration, data and curves of {folds.name})")
    where = f"{folds.name}, " if folds else ""   # a cross-validation run: the training warnings are the first fold's
    stage1 = [] if ctx1 is None else [f"{where}stage 1 (locate): {w}" for w in training_warnings(ctx1)]
    trained = [f"{where.rstrip(', ')}: {w}" if where else w for w in training_warnings(ctx)]
    warnings = (cv_warnings(cv) + detection_warnings(ctx["evaluation"]) + evaluation_warnings(ctx["evaluation"])
                + stage1 + trained + clinical_warnings(ctx["clin_stats"], ctx["clin_positive"]))
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{esc(title)}</h1>",
            f"<p class='note'>Generated {created} by hpc-dfs {__version__} from <code>{esc(run)}</code>.</p>",
            headline(ctx), warnings_box(warnings), section_cv(cv), section_run(ctx), section_data(ctx),
            *_stage_sections(ctx, ctx1),
            section_evaluation(ctx["evaluation"], ctx["eval_path"]), section_overlays(ctx["evaluation"], ctx["pred"]),
            section_prediction(ctx["pred"], ctx["evaluation"]), section_clinical(ctx["clin"], ctx)]
    return page(title, body)
