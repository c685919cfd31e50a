"""A cross-validation run (``train --folds``) in the report: each fold's best validation metrics, their mean and SD, and
the pooled out-of-fold evaluation per fold (``predict --oof`` + ``evaluate``).

The folds are read through the run contract (``cv_summary``: ``RUN/fold_K/fold.json`` and the checkpoints); the
out-of-fold evaluation is ``--eval`` when it is one (it has ``oof``), else ``RUN/oof/eval.json`` when that exists
(where ``slurm/predict.sbatch`` writes it).
"""
from __future__ import annotations

from pathlib import Path

from hpc_dfs.contracts import checkpoint as ckpt_contract, run as run_contract
from hpc_dfs.contracts.evaluation import EVAL_NAME
from hpc_dfs.report.html import esc, missing, num, table
from hpc_dfs.report.sources import ReportError, read_json

__all__ = ["OOF_DIR", "cv_context", "first_fold_run", "section_cv", "cv_warnings"]

#: where the SLURM pipeline writes the out-of-fold predictions of a cross-validation run (RUN/oof)
OOF_DIR = "oof"
#: the validation metrics of the per-fold table: (key, heading, number kind)
FOLD_METRICS = (("kidney_dice", "kidney Dice", "dice"), ("tumor_dice", "tumour Dice", "dice"),
                ("val_loss", "validation loss", "loss"))
POOLED_METRICS = (("kidney_dice", "kidney Dice"), ("tumor_dice", "tumour Dice"), ("kits_score", "KiTS19 score"))


def cv_context(run: Path, evaluation: dict | None, eval_path: Path | None) -> dict | None:
    """The cross-validation run's summary and its out-of-fold evaluation; None when ``run`` is not one.

    Args:
        run: the folder given to ``hpc-dfs report``.
        evaluation: the ``--eval`` JSON (used when it is out-of-fold), or None.
        eval_path: its path.

    Raises:
        ReportError: a fold's records or checkpoints cannot be read, or ``RUN/oof/eval.json`` is not JSON.
    """
    if not run_contract.is_cv_run(run):
        return None
    try:
        summary = run_contract.cv_summary(run)
    except (run_contract.RunFolderError, ckpt_contract.CheckpointError) as e:
        raise ReportError(str(e)) from None
    oof, oof_path = (evaluation, eval_path) if evaluation and "oof" in evaluation else (None, None)
    default = Path(run) / OOF_DIR / EVAL_NAME
    if oof is None and default.is_file():
        oof, oof_path = read_json(default), default
    return {"run": Path(run), "summary": summary, "oof": oof, "oof_path": oof_path}


def first_fold_run(run: Path) -> Path:
    """The lowest fold's folder, whose configuration, data and curves the page shows (the folds share settings).

    Args:
        run: a cross-validation run.
    """
    return next(iter(run_contract.fold_dirs(run).values()))


def _sd(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mu = sum(values) / len(values)
    return (sum((v - mu) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _fold_table(summary: dict, stage: str) -> str:
    rows = []
    for f in summary["folds"]:
        rec = f["stages"].get(stage) or {}
        rows.append([f"fold {f['fold']}" + ("" if f["finished"] else " (unfinished)"), f["n_val_cases"],
                     rec.get("epochs"), rec.get("best_epoch"),
                     *(num((rec.get("best") or {}).get(k), kind) for k, _, kind in FOLD_METRICS)])
    done = [f["stages"].get(stage, {}).get("best", {}) for f in summary["folds"] if f["finished"]]
    stats = []
    for k, _, kind in FOLD_METRICS:
        vals = [float(b[k]) for b in done if isinstance(b.get(k), (int, float))]
        sd = _sd(vals)
        stats.append("-" if not vals else f"{num(sum(vals) / len(vals), kind)}"
                     + ("" if sd is None else f" ± {num(sd, kind)}"))
    rows.append([f"mean ± SD ({len(done)} folds)", "", "", "", *stats])
    return table(["fold", "validation cases", "epochs", "best epoch", *(h for _, h, _ in FOLD_METRICS)], rows)


def _pooled_table(oof: dict) -> str:
    cv = oof["oof"]
    rows = [[f"fold {k}", m.get("n_cases"), *(num(m.get(key)) for key, _ in POOLED_METRICS)]
            for k, m in cv["per_fold"].items()]
    rows.append(["mean ± SD of the folds", "", *(
        f"{num(cv['fold_mean'].get(key))} ± {num(cv['fold_sd'].get(key))}" if key in cv["fold_mean"] else "-"
        for key, _ in POOLED_METRICS)])
    m = oof.get("mean") or {}
    rows.append(["<b>pooled</b>", f"<b>{esc(m.get('n_cases'))}</b>",
                 *(f"<b>{num(m.get(key))}</b>" for key, _ in POOLED_METRICS)])
    head = ["", "cases", *(h for _, h in POOLED_METRICS)]
    return table(head, [[c if str(c).startswith("<b>") else esc(c) for c in r] for r in rows], raw=True)


def section_cv(cv: dict | None) -> str:
    """The cross-validation section: per fold (and stage) the best validation metrics; the pooled out-of-fold set.

    Args:
        cv: :func:`cv_context`, or None (no section).
    """
    if cv is None:
        return ""
    s = cv["summary"]
    out = ["<h2>Cross-validation</h2>",
           f"<p>{esc(s['n_folds'])} folds (the manifest's, by case), each trained with its own fold held out for "
           f"validation, into <code>{esc(cv['run'])}/fold_K</code>. Best-epoch validation metrics per fold "
           "(the validation slices of the training run):</p>"]
    stages = list(s["mean"]) or [s["stage"]]
    for stage in stages:
        if len(stages) > 1:
            out.append(f"<h3>Stage {esc(stage)}</h3>")
        out.append(_fold_table(s, stage))
    out.append("<h3>Pooled out-of-fold evaluation</h3>")
    if cv["oof"] is None:
        out.append(missing("no out-of-fold evaluation", f"run `hpc-dfs predict --oof {cv['run']} --input DATA --out "
                           f"{cv['run']}/{OOF_DIR}` and `hpc-dfs evaluate --pred {cv['run']}/{OOF_DIR} --gt DATA "
                           f"--out {cv['run']}/{OOF_DIR}/{EVAL_NAME}`"))
    else:
        out.append(f"<p><code>{esc(cv['oof_path'])}</code>: every case predicted by the model of its own fold and "
                   "scored on the native grid; pooled = all cases as one set (nnU-Net's pooled validation).</p>")
        out.append(_pooled_table(cv["oof"]))
    return "\n".join(out)


def cv_warnings(cv: dict | None) -> list[str]:
    """One line when folds are missing or unfinished (the ensemble and the pooled set need every fold).

    Args:
        cv: :func:`cv_context`, or None.
    """
    if cv is None or not cv["summary"]["missing_folds"]:
        return []
    folds = ", ".join(map(str, cv["summary"]["missing_folds"]))
    return [f"cross-validation: fold(s) {folds} of {cv['summary']['n_folds']} missing or unfinished "
            f"(`hpc-dfs train --folds {folds.replace(', ', ',')} --auto-resume`)"]
