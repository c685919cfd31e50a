"""What every rank checks and loads before the first case (:class:`Setup`), and the ranks' agreement on it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_dfs import config as cfgmod, fsutil, parallel
from hpc_dfs.config.predict import PredictConfig
from hpc_dfs.contracts import prediction as pred_contract
from hpc_dfs.errors import EXIT_USAGE, HpcDfsError
from hpc_dfs.inference.cases import CaseInput, discover_inputs, load_records
from hpc_dfs.inference.errors import PredictError
from hpc_dfs.inference.folds import OofModels, expand_cv_runs, load_oof, oof_cases
from hpc_dfs.inference.replicas import Replica, load_refine_replicas, load_replicas
from hpc_dfs.log import get_logger

__all__ = ["PredictPaths", "Setup", "setup_on_every_rank"]

log = get_logger("hpc_dfs.predict")


@dataclass
class PredictPaths:
    """The paths of a run: argparse arguments (``--checkpoint``, ``--input``, ``--out``, ``--clinical``)."""

    checkpoints: list[Path]
    input: Path
    out: Path
    clinical: Path | None = None
    refine_checkpoints: list[Path] = field(default_factory=list)
    oof: Path | None = None       # --oof: a cross-validation run, each fold predicting its own validation cases


@dataclass
class Setup:
    """What every rank has checked and loaded before the first case."""

    device: Any
    cases: list[CaseInput]
    reps: list[Replica]
    records: dict[str, dict]
    clinical_source: Path | None
    refine: list[Replica] = field(default_factory=list)
    oof: OofModels | None = None

    def models_for(self, case_id: str) -> tuple[list[Replica], list[Replica], int | None]:
        """The replicas that predict ``case_id`` (its fold's under ``--oof``), and that fold (else None)."""
        if self.oof is None:
            return self.reps, self.refine, None
        fold = self.oof.case_fold[case_id]
        return (*self.oof.by_fold[fold], fold)


def _device(choice: str):
    """The torch device for ``--device auto|cpu|cuda``; raises PredictError when CUDA is asked for but absent."""
    import torch
    if choice == "cpu":
        return torch.device("cpu")
    device = parallel.device()
    if choice == "cuda" and device.type != "cuda":
        raise PredictError("--device cuda asked for but CUDA is not available")
    return device


def _setup(cfg: PredictConfig, paths: PredictPaths) -> Setup:
    """Check the paths, load the checkpoints and records, create ``--out`` (raises HpcDfsError)."""
    device = _device(cfg.device)
    if paths.oof is not None:
        return _setup_oof(cfg, paths, device)
    paths.checkpoints, paths.refine_checkpoints = expand_cv_runs(paths.checkpoints, paths.refine_checkpoints,
                                                                 parallel.rank() == 0)
    for given, n, flag in ((cfg.weights, len(paths.checkpoints), "checkpoint"),
                           (cfg.refine_weights, len(paths.refine_checkpoints), "refine-checkpoint")):
        if given and len(given) != n:
            raise PredictError(f"got {len(given)} weights for {n} --{flag} (cross-validation runs count one per "
                               "fold); give one weight per checkpoint or none", code=EXIT_USAGE)
    for ckpt in paths.checkpoints:
        cfgmod.require_path(ckpt, "file", "--checkpoint")
    cases, data_root = discover_inputs(paths.input)
    reps = load_replicas([str(p) for p in paths.checkpoints], cfg.weights, device)
    for r in (r for r in reps if r.info.get("stage") == "refine"):   # the mirror of load_refine_replicas' check
        raise PredictError(f"--checkpoint {r.path} was trained with --stage refine (a stage-2 checkpoint): pass it "
                           "as --refine-checkpoint, and a --stage locate one here")
    for ckpt in paths.refine_checkpoints:
        cfgmod.require_path(ckpt, "file", "--refine-checkpoint")
    refine = load_refine_replicas(paths.refine_checkpoints, cfg.refine_weights, reps, device)
    records, clinical_source = load_records(paths.clinical, data_root)
    _take_out(paths)
    return Setup(device, cases, reps, records, clinical_source, refine)


def _setup_oof(cfg: PredictConfig, paths: PredictPaths, device) -> Setup:
    """``--oof RUN``: every fold's model, and the input's cases that are some fold's validation cases."""
    cfgmod.require_path(paths.oof, "dir", "--oof")
    oof = load_oof(paths.oof, device)
    cases, data_root = discover_inputs(paths.input)
    cases = oof_cases(cases, oof, parallel.rank() == 0)
    records, clinical_source = load_records(paths.clinical, data_root)
    _take_out(paths)
    reps = [r for fold_reps, _ in oof.by_fold.values() for r in fold_reps]
    refine = [r for _, fold_refine in oof.by_fold.values() for r in fold_refine]
    return Setup(device, cases, reps, records, clinical_source, refine, oof=oof)


def _take_out(paths: PredictPaths) -> None:
    """Create ``--out``; rank 0 locks it and removes the temporary files of an interrupted run."""
    paths.out.mkdir(parents=True, exist_ok=True)
    if parallel.rank() == 0:  # before any rank writes: the ranks agree on the setup (a collective) right after this
        fsutil.lock_folder(paths.out, "hpc-dfs predict")   # a second predict into --out is refused, not mixed in
        n_stale = sum(fsutil.clean_stale_tmp(d) for d in (paths.out, paths.out / pred_contract.RAW_DIR) if d.is_dir())
        if n_stale:
            log.info("removed %d temporary file(s) left in %s by an interrupted run", n_stale, paths.out)


def setup_on_every_rank(cfg: PredictConfig, paths: PredictPaths) -> Setup:
    """:func:`_setup` on every rank, and the ranks agree: when it failed on any rank, it raises on all of them.

    So a problem seen by one rank only (a file missing on one node) stops the job instead of leaving
    the other ranks waiting in a collective.
    """
    setup, error = None, None
    try:
        setup = _setup(cfg, paths)
    except HpcDfsError as e:
        error = e
    reports = parallel.allgather_object(None if error is None else (str(error), error.code))
    if error is not None:
        raise error
    for r, report in enumerate(reports):
        if report:
            raise PredictError(f"rank {r}: {report[0]}", code=report[1])
    return setup
