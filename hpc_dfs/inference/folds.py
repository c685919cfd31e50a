"""The folds of a cross-validation run (``train --folds``) at inference: their ensemble, or each fold's own cases.

- ``predict --checkpoint RUN`` with a cross-validation run: every fold's ``best.pt`` is a replica (and, for a
  cascade trained with ``--stage both``, every fold's stage-2 ``best.pt`` a refine replica): :func:`expand_cv_runs`.
- ``predict --oof RUN``: each fold's validation cases (recorded in ``RUN/fold_K/fold.json``, from the manifest the
  folds trained on) are predicted by that fold's model alone: :func:`load_oof`, so that ``evaluate`` scores the
  pooled out-of-fold set (nnU-Net's pooled validation) and each fold's share of it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from hpc_dfs.contracts import run as run_contract
from hpc_dfs.errors import EXIT_USAGE
from hpc_dfs.inference.cases import CaseInput
from hpc_dfs.inference.errors import PredictError
from hpc_dfs.inference.replicas import Replica, load_refine_replicas, load_replicas
from hpc_dfs.log import get_logger

__all__ = ["OofModels", "cv_folds", "expand_cv_runs", "load_oof", "oof_cases"]

log = get_logger("hpc_dfs.predict")


@dataclass
class OofModels:
    """``predict --oof``: per fold its replicas (stage 1, and stage 2 for a cascade), and the fold of each case."""

    run: Path
    by_fold: dict[int, tuple[list[Replica], list[Replica]]]
    case_fold: dict[str, int]

    def record(self) -> dict:
        """The summary's ``oof`` entry: the run, and per fold its checkpoints and validation cases."""
        return {"run": str(self.run), "folds": {
            str(k): {"checkpoints": [str(r.path) for r in reps], "refine_checkpoints": [str(r.path) for r in refine],
                     "cases": sorted(c for c, f in self.case_fold.items() if f == k)}
            for k, (reps, refine) in self.by_fold.items()}}


def cv_folds(run: Path) -> list[run_contract.FoldCheckpoints]:
    """Every fold's best checkpoints (:func:`hpc_dfs.contracts.run.fold_checkpoints`), as a :class:`PredictError`.

    Args:
        run: a cross-validation run folder.

    Raises:
        PredictError: not a cross-validation run, or a fold missing or unfinished (one line naming them).
    """
    try:
        return run_contract.fold_checkpoints(run)
    except run_contract.RunFolderError as e:
        raise PredictError(str(e), code=EXIT_USAGE) from None


def _expand(path: Path, stage: str) -> list[Path]:
    folds = cv_folds(path)
    taken = [f[stage] for f in folds]
    if any(p is None for p in taken):
        other = "--refine-checkpoint" if stage == "refine" else "--checkpoint"
        raise PredictError(f"cross-validation run {path}: its folds have no {stage} stage (trained with --stage "
                           f"{'locate' if stage == 'refine' else 'refine'}); give it as {other}", code=EXIT_USAGE)
    return taken


def expand_cv_runs(checkpoints: list[Path], refine: list[Path], main: bool) -> tuple[list[Path], list[Path]]:
    """``--checkpoint`` / ``--refine-checkpoint`` with every cross-validation run folder replaced by its folds' best
    checkpoints (a cascade's stage 2 joins the refine list); files are kept as given.

    Args:
        checkpoints: the ``--checkpoint`` paths.
        refine: the ``--refine-checkpoint`` paths.
        main: log which checkpoints were taken (rank 0).

    Raises:
        PredictError: a fold missing or unfinished, or a cascade run's stage 2 given beside other refine checkpoints.
    """
    out, out_refine = [], []
    for p in checkpoints:
        if not (p.is_dir() and run_contract.is_cv_run(p)):
            out.append(p)
            continue
        folds = cv_folds(p)
        out += _expand(p, "locate")
        if all(f["refine"] is not None for f in folds):
            if refine:
                raise PredictError(f"--checkpoint {p} is a cascade cross-validation run that brings its folds' stage "
                                   "2; leave --refine-checkpoint out", code=EXIT_USAGE)
            out_refine += [f["refine"] for f in folds]
        if main:
            log.info("cross-validation run %s: the ensemble of its %d folds, %s", p, len(folds),
                     "; ".join(f"fold {f['fold']}: " + ", ".join(str(f[s]) for s in ("locate", "refine") if f[s])
                               for f in folds))
    for p in refine:
        if p.is_dir() and run_contract.is_cv_run(p):
            taken = _expand(p, "refine")
            out_refine += taken
            if main:
                log.info("cross-validation run %s: stage 2 of its %d folds, %s", p, len(taken),
                         ", ".join(map(str, taken)))
        else:
            out_refine.append(p)
    return out, out_refine


def load_oof(run: Path, device) -> OofModels:
    """Load every fold's model of a cross-validation run, once; they must agree on preprocessing and classes.

    Args:
        run: the cross-validation run (``--oof``).
        device: the torch device.

    Raises:
        PredictError: a fold missing or unfinished, or checkpoints that cannot be loaded or disagree (named).
    """
    folds = cv_folds(run)
    locate = [f["locate"] for f in folds]
    if any(p is None for p in locate):
        raise PredictError(f"--oof {run}: its folds were trained with --stage refine alone; train them with --stage "
                           "both (a cascade) or locate", code=EXIT_USAGE)
    reps = load_replicas([str(p) for p in locate], [], device)
    refine_paths = [f["refine"] for f in folds if f["refine"] is not None]
    refine = load_refine_replicas(refine_paths, [], reps, device) if refine_paths else []
    by_fold, case_fold = {}, {}
    for i, f in enumerate(folds):
        mine = [dataclasses.replace(reps[i], weight=1.0, info={**reps[i].info, "fold": f["fold"]})]
        mine_refine = [dataclasses.replace(refine[i], weight=1.0, info={**refine[i].info, "fold": f["fold"]})] \
            if refine else []
        by_fold[f["fold"]] = (mine, mine_refine)
        case_fold.update({c: f["fold"] for c in f["val_cases"]})
    return OofModels(Path(run), by_fold, case_fold)


def oof_cases(cases: list[CaseInput], oof: OofModels, main: bool) -> list[CaseInput]:
    """The cases of ``--input`` that are some fold's validation cases; the others are named in a warning.

    Args:
        cases: the cases found in ``--input``.
        oof: the folds' models and the fold of each case.
        main: log (rank 0).

    Raises:
        PredictError: no case of ``--input`` is a validation case of the run.
    """
    kept = [c for c in cases if c.case_id in oof.case_fold]
    if not kept:
        raise PredictError(f"--oof {oof.run}: none of the {len(cases)} input case(s) is a validation case of its "
                           "folds: give the data the run's shards were preprocessed from", code=EXIT_USAGE)
    if main:
        other = sorted(c.case_id for c in cases if c.case_id not in oof.case_fold)
        absent = sorted(set(oof.case_fold) - {c.case_id for c in cases})
        if other:
            log.warning("--oof: %d input case(s) are in no fold of %s and are not predicted: %s", len(other), oof.run,
                        ", ".join(other))
        if absent:
            log.warning("--oof: %d validation case(s) of %s are not in --input, so the pooled set lacks them: %s",
                        len(absent), oof.run, ", ".join(absent))
        log.info("--oof %s: %d case(s), each predicted by its own fold's model (%s)", oof.run, len(kept),
                 "; ".join(f"fold {k}: {sum(1 for c in kept if oof.case_fold[c.case_id] == k)} case(s)"
                           for k in oof.by_fold))
    return kept
