"""Cross-validation in one launch: ``hpc-dfs train --folds all`` (or ``0,2``) trains the folds one after the other.

Fold K holds out the manifest's fold K for validation (``schedule.val_fold = K``) and trains into ``RUN/fold_K``
(``--stage both``: ``RUN/fold_K/locate`` and ``RUN/fold_K/refine``), on the same ranks. With ``--resume`` or
``--auto-resume`` a fold whose stages have all their epochs is skipped, one with a ``last.pt`` resumes and the others
start. Rank 0 writes ``RUN/fold_K/fold.json`` when a fold starts and when it finishes, and rebuilds ``RUN/cv.json``
from the fold folders after each fold (:mod:`hpc_dfs.contracts.run`, CONTRACTS.md section 3).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from hpc_dfs import parallel
from hpc_dfs.config import ConfigError
from hpc_dfs.config.train import TrainConfig
from hpc_dfs.contracts import checkpoint as ckpt, run as run_contract, shards as shards_contract
from hpc_dfs.fsutil import sha256_file
from hpc_dfs.log import get_logger
from hpc_dfs.training.plan import checked

__all__ = ["parse_folds", "fold_config", "fold_finished", "train_folds"]

log = get_logger("hpc_dfs.train")


def parse_folds(spec: str, n_folds: int) -> list[int]:
    """The folds ``--folds`` asks for: ``all`` (every fold of the manifest) or a comma list such as ``0,2``.

    Args:
        spec: the ``--folds`` value.
        n_folds: the manifest's ``n_folds``.

    Raises:
        ConfigError: not ``all`` nor whole numbers, a fold outside ``0..n_folds-1``, or a fold given twice.
    """
    if spec.strip().lower() == "all":
        return list(range(n_folds))
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--folds {spec!r}: give 'all' or fold numbers separated by commas (e.g. 0,2)")
    folds = [int(p) for p in parts]
    bad = [k for k in folds if k >= n_folds]
    if bad:
        raise ConfigError(f"--folds {spec!r}: the shards have {n_folds} folds (0..{n_folds - 1}); no fold "
                          f"{', '.join(map(str, bad))}")
    if len(set(folds)) != len(folds):
        raise ConfigError(f"--folds {spec!r} names a fold twice")
    return sorted(folds)


def fold_config(cfg: TrainConfig, fold: int) -> TrainConfig:
    """``cfg`` with fold ``fold`` held out for validation (``schedule.val_fold``).

    Args:
        cfg: the run's settings.
        fold: the manifest fold to hold out.
    """
    return dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, val_fold=fold))


def fold_finished(fold_run: Path, cfg: TrainConfig) -> bool:
    """Every stage of the fold has a ``last.pt`` with all the epochs asked for.

    Args:
        fold_run: ``RUN/fold_K``.
        cfg: the fold's settings.

    Raises:
        CheckpointError: a ``last.pt`` cannot be read (named).
    """
    for stage_run in run_contract.fold_stage_dirs(fold_run, cfg.stage).values():
        last = ckpt.last_path(stage_run)
        if not last.is_file() or int(ckpt.read_meta(last).get("epoch", 0)) < cfg.schedule.epochs:
            return False
    return True


def _started(fold_run: Path, cfg: TrainConfig) -> bool:
    """The fold's first stage has a ``last.pt`` to resume from."""
    first = next(iter(run_contract.fold_stage_dirs(fold_run, cfg.stage).values()))
    return ckpt.last_path(first).is_file()


def _fold_plan(shards_dir: Path, spec: str) -> tuple[list[int], dict, str]:
    """The folds asked for, the manifest and its sha256 (raises ConfigError or ShardError)."""
    manifest = shards_contract.read_manifest(shards_dir)
    n_folds = int(manifest.get("n_folds") or 0)
    if n_folds < 2:
        raise ConfigError(f"{shards_contract.manifest_path(shards_dir)} has n_folds = {n_folds}: cross-validation "
                          "needs at least 2 folds (preprocess with --n-folds 5)")
    return parse_folds(spec, n_folds), manifest, sha256_file(shards_contract.manifest_path(shards_dir))


def _write_fold_info(fold_run: Path, cfg: TrainConfig, fold: int, manifest: dict, sha: str, shards_dir: Path,
                     finished: bool) -> None:
    cases = manifest.get("cases", [])
    run_contract.write_fold_info(fold_run, {
        "fold": fold, "n_folds": int(manifest["n_folds"]), "stage": cfg.stage,
        "val_cases": sorted(c["case_id"] for c in cases if c.get("fold") == fold),
        "n_train_cases": sum(1 for c in cases if c.get("fold") != fold), "manifest_sha256": sha,
        "shards": str(Path(shards_dir).resolve()), "epochs": cfg.schedule.epochs, "finished": finished})


def _finished_folds(out: Path) -> list[int]:
    """The folds whose ``fold.json`` says finished (cheap: no checkpoint is read)."""
    return [k for k, d in run_contract.fold_dirs(out).items() if (run_contract.read_fold_info(d) or {}).get("finished")]


def _write_cv_summary(out: Path) -> None:
    """Rank 0: ``RUN/cv.json`` from the fold folders; rebuilt while the finished folds change under it, so that a
    fold that another SLURM array task finished meanwhile is not left out."""
    summary = None
    for _ in range(3):
        before = _finished_folds(out)
        summary = run_contract.cv_summary(out)
        run_contract.write_cv_summary(out, summary)
        if _finished_folds(out) == before:
            break
    done = [f["fold"] for f in summary["folds"] if f["finished"]]
    log.info("cross-validation %s: %d of %d folds finished (%s)%s", out / run_contract.CV_NAME, len(done),
             summary["n_folds"], ", ".join(map(str, done)) or "none",
             f"; missing: {', '.join(map(str, summary['missing_folds']))}" if summary["missing_folds"] else "")


def train_folds(cfg: TrainConfig, shards_dir: Path, out: Path, spec: str, resume: bool,
                train_fold: Callable[[TrainConfig, Path, Path, bool], int]) -> int:
    """Train the folds ``spec`` names one after the other, into ``out/fold_K``; returns the first non-zero code.

    Args:
        cfg: the run's settings (``schedule.val_fold`` is replaced per fold).
        shards_dir: the SHARDS folder.
        out: the cross-validation run folder.
        spec: ``--folds`` (``all`` or ``0,2``).
        resume: skip finished folds and resume started ones (``--resume`` / ``--auto-resume``).
        train_fold: trains one fold: ``(cfg, shards_dir, fold_out, resume) -> exit code`` (the stage driver's run).

    Raises:
        SetupError: a bad ``--folds`` or manifest, on every rank (rank 0 logged it).
        CheckpointError, RunFolderError, DiskWriteError: a fold's records cannot be read or written (named).
    """
    folds, manifest, sha = checked(log, "bad --folds", lambda: _fold_plan(Path(shards_dir), spec))
    if parallel.is_main() and cfg.schedule.val_fold:
        log.warning("schedule.val_fold=%d is not used: --folds holds out each fold in turn", cfg.schedule.val_fold)
    if parallel.is_main():
        log.info("cross-validation: folds %s of %d into %s", ", ".join(map(str, folds)), int(manifest["n_folds"]),
                 ", ".join(str(run_contract.fold_dir(out, k)) for k in folds))
    for k in folds:
        sub, fold_run = fold_config(cfg, k), run_contract.fold_dir(out, k)
        finished = checked(log, f"cannot read fold {k}", lambda d=fold_run, c=sub: resume and fold_finished(d, c))
        if finished:
            if parallel.is_main():
                log.info("fold %d: %s already finished its %d epochs; skipped", k, fold_run, sub.schedule.epochs)
                _write_fold_info(fold_run, sub, k, manifest, sha, shards_dir, finished=True)
            continue
        started = _started(fold_run, sub)
        if parallel.is_main():
            log.info("fold %d of %d: validation on fold %d, into %s", k, int(manifest["n_folds"]), k, fold_run)
            if resume or not started:   # else train refuses the fold's last.pt, and its record stays as it was
                _write_fold_info(fold_run, sub, k, manifest, sha, shards_dir, finished=False)
        rc = train_fold(sub, Path(shards_dir), fold_run, resume and started)
        if rc:
            return rc
        if parallel.is_main():
            _write_fold_info(fold_run, sub, k, manifest, sha, shards_dir, finished=True)
            _write_cv_summary(out)
    if parallel.is_main() and not (out / run_contract.CV_NAME).is_file():   # every fold was skipped
        _write_cv_summary(out)
    return 0
