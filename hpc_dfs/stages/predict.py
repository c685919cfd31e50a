"""Whole-volume inference back to the native grid: ``hpc-dfs predict`` (the paper's steps 4 and 5).

    hpc-dfs predict --checkpoint runs/r1/checkpoints/best.pt --input data/kits --out runs/r1/pred
    mpirun -np 4 hpc-dfs predict --checkpoint f0/best.pt --checkpoint f1/best.pt --weights 0.6,0.4 \\
        --input data/kits --out pred --tta --save-raw
    hpc-dfs predict --checkpoint runs/cv --input data/test --out pred    # every fold of `train --folds all`
    hpc-dfs predict --oof runs/cv --input data/kits --out oof             # each case by its own fold's model

``--checkpoint RUN`` with a cross-validation run (``RUN/fold_K/``, ``hpc-dfs train --folds``) takes every fold's
``best.pt`` as a replica (a cascade's folds bring their stage-2 ``best.pt`` as refine replicas); a missing or
unfinished fold stops the run with one error. ``--oof RUN`` predicts each fold's validation cases (the manifest's
assignment, recorded in ``RUN/fold_K/fold.json``) with that fold's model alone, into one folder: the pooled
out-of-fold set, which ``evaluate`` scores as a whole and per fold (each case's ``fold`` is in ``summary.json``).

``--input`` is a KiTS case folder (``case_XXXXX/imaging.nii.gz``), a folder of such cases, or one
``imaging.nii.gz``. Clinical records come from ``kits.json`` beside the cases or from ``--clinical``.

Per case:

1. the CT is transformed exactly as in training, with the ``preprocessing`` parameters stored in the
   checkpoint (:func:`hpc_dfs.data.geometry.prepare_image`): reorientation, resampling, crop/pad,
   intensity normalisation;
2. the slices go through every checkpoint in batches (``torch.inference_mode``), optionally with
   flip test-time augmentation (identity, H flip, W flip, both; softmax probabilities averaged);
   several checkpoints (e.g. k-fold replicas) are combined by the weighted average of their
   probabilities -- the paper's "aggregate the predictions of each model replica";
3. the probabilities are resampled back to the native grid
   (:func:`hpc_dfs.data.geometry.restore_volume`) and the argmax is the label map, with exactly the
   input's shape and affine (its NIfTI header is copied, so qform/sform are the input's);
4. the label map is post-processed (:mod:`hpc_dfs.postprocess`, switch off with ``--no-postprocess``);
5. the case-level risk is the mean of ``sigmoid(risk_logit)`` over the slices (as in training
   validation), weighted-averaged over checkpoints.

Outputs in ``--out`` (CONTRACTS.md section 4): ``prediction_XXXXX.nii.gz`` (uint8), optionally
``probabilities_XXXXX.nii.gz`` (float32, classes on the last axis) and ``raw/prediction_XXXXX.nii.gz``
(before post-processing), ``overlay_XXXXX.png``, and, from rank 0, ``risk.csv`` and ``summary.json``
(per-case timing, status and errors).

Provenance: each case's row in ``summary.json`` holds the sha256 of the checkpoint file(s) and of the input
image, and every NIfTI written for it says ``hpc-dfs <checkpoints sha[:12]> <input sha[:12]>`` in its header's
``descrip``; ``evaluate`` refuses a prediction that is not from the run of the summary. A case that fails has
its outputs from an earlier run moved to ``--out/stale/``. Rank 0 removes ``.tmp-*`` files of a killed run
before any rank writes. A full disk stops the run with one line naming the file being written (exit code 4).

Distributed: under ``mpirun``/``srun``/``horovodrun`` the cases are split over ranks, balanced by
voxel count; each rank writes its own cases and rank 0 gathers the summary. A case's outputs depend
only on the case and the checkpoints -- batches never mix cases, the CPU thread count is fixed
(``--threads``, default 1), cuDNN runs deterministically, and NIfTI files are gzipped with
``mtime=0`` -- so they are byte-identical whatever the number of ranks.

Bad inputs (an unreadable file, a shape the model cannot take, a malformed clinical record) get one
error line naming the case and are skipped; the exit code is 1 when any case failed. A case without
a clinical record runs image-only: a fusion model gets the pipeline's imputed all-missing vector,
and ``risk.csv`` says ``clinical_used=0``. A checkpoint without preprocessing parameters, or
checkpoints that disagree on them, stop the run before any case (exit code 2), on every rank: the
ranks agree on the setup, so a problem that one rank alone sees (a file missing on its node) stops the
whole job instead of leaving the others waiting. The paths (``--checkpoint``, ``--input``, ``--out``,
``--clinical``) are arguments; every other setting is a ``PredictConfig`` field (``--config``, ``--set``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from hpc_dfs import __version__, config as cfgmod, fsutil, parallel
from hpc_dfs.config.predict import PredictConfig
from hpc_dfs.contracts import prediction as pred_contract
from hpc_dfs.errors import EXIT_ENV, EXIT_PARTIAL  # cli.main catches the HpcDfsErrors raised here
from hpc_dfs.inference.case import move_aside, predict_case
from hpc_dfs.inference.cases import CaseInput, partition, voxel_counts
from hpc_dfs.inference.errors import InferenceError, PredictError
from hpc_dfs.inference.setup import PredictPaths, Setup, setup_on_every_rank
from hpc_dfs.log import get_logger

CLI_LONG_HELP = True  # `hpc-dfs predict --help` shows this module's whole docstring

log = get_logger("hpc_dfs.predict")


# ----------------------------------------------------------------------------- summary


def _write_summary(rows: list[dict], setup: Setup, cfg: PredictConfig, paths: PredictPaths, threads: int,
                   seconds: float) -> None:
    """Rank 0: ``risk.csv`` and ``summary.json`` of all ranks' rows, and the closing log lines."""
    failed = [r for r in rows if r["status"] != "ok"]
    reps = setup.reps
    summary = {
        "hpc_dfs_version": __version__, "world_size": parallel.size(), "threads_per_rank": threads,
        "device": str(setup.device),
        "checkpoints": [{"path": str(r.path), "weight": r.weight, "model": r.model_name, **r.info} for r in reps],
        "refine_checkpoints": [{"path": str(r.path), "weight": r.weight, "model": r.model_name, "context": r.context,
                                **r.info} for r in setup.refine],
        "classes": reps[0].classes, "preprocessing": reps[0].preprocessing,
        "clinical_source": str(setup.clinical_source) if setup.clinical_source else None,
        "input": str(paths.input), "out": str(paths.out),
        **({"oof": setup.oof.record()} if setup.oof else {}),
        "config": cfgmod.to_dict(cfg), "n_cases": len(rows), "n_ok": len(rows) - len(failed),
        "n_failed": len(failed), "wall_seconds": round(seconds, 3), "cases": rows,
    }
    summary_path = pred_contract.write_summary(paths.out, summary)
    log.info("%d of %d cases written to %s in %.1f s", len(rows) - len(failed), len(rows), paths.out,
             summary["wall_seconds"])
    if failed:
        log.error("%d of %d cases failed (%s); their errors are above and in %s", len(failed), len(rows),
                  ", ".join(r["case_id"] for r in failed), summary_path)


# ----------------------------------------------------------------------------- the run


def _predict_all(cases: list[CaseInput], setup: Setup, cfg: PredictConfig, out_dir: Path) -> list[dict]:
    """Summary rows of ``cases``; a case that fails gets one error line and a ``failed`` row, the others go on.

    A failed case's outputs already in ``out_dir`` are moved aside (:func:`move_aside`). A full disk stops this
    rank's loop: the case and those after it get ``failed`` rows with ``disk_full`` set (see :func:`run`).
    """
    rows, disk_full = [], None
    for i, case in enumerate(cases):
        row = {"case_id": case.case_id, "status": "failed", "image": str(case.image_path)}
        if disk_full is not None:
            rows.append({**row, "error": f"not attempted: {disk_full}", "disk_full": True, "rank": parallel.rank()})
            continue
        reps, refine, fold = setup.models_for(case.case_id)
        try:
            row = predict_case(case, reps, cfg, setup.records, setup.clinical_source, out_dir, setup.device,
                               refine=refine)
            log.info("[%d/%d] %s done in %.2f s%s", i + 1, len(cases), case.case_id, row["seconds"]["total"],
                     "" if row["risk_prob"] is None else f", risk {row['risk_prob']:.3f}")
        except fsutil.DiskWriteError as e:
            disk_full = str(e)
            log.error("%s: %s", case.case_id, e)
            row.update(error=str(e), disk_full=True)
        except InferenceError as e:
            log.error("%s: %s -- skipped", case.case_id, e)
            row["error"] = str(e)
        except Exception as e:  # an unexpected failure of one case must not stop the others
            log.error("%s: %s: %s -- skipped", case.case_id, type(e).__name__, e)
            row["error"] = f"{type(e).__name__}: {e}"
        if row["status"] != "ok":
            _move_aside_quietly(case, out_dir)
        row["rank"] = parallel.rank()
        if fold is not None:   # --oof: the fold whose model predicted the case
            row["fold"] = fold
        rows.append(row)
    return rows


def _move_aside_quietly(case: CaseInput, out_dir: Path) -> None:
    """:func:`move_aside`, where a failure to move (a full disk) only costs a warning: the case failed anyway."""
    try:
        move_aside(case, out_dir)
    except OSError as e:
        log.warning("%s: could not move its earlier outputs aside (%s)", case.case_id, e)


def run(cfg: PredictConfig, paths: PredictPaths) -> int:
    """Predict every case of ``paths.input``, this rank's share of them; the exit code is the same on all ranks.

    Returns:
        0 when every case was written, 1 when some failed (each named in the log and in summary.json).

    Raises:
        HpcDfsError: a problem that stops the run before any case (raised on every rank, see
            :func:`~hpc_dfs.inference.setup.setup_on_every_rank`), or a full disk (exit 4, the file named; on
            every rank).
    """
    import torch

    from hpc_dfs.parallel.phases import PhaseClock
    clock = PhaseClock()
    clock.mark("start+imports")
    parallel.init(horovod=False)  # ranks + object collectives only (mpi4py under MPI launchers)
    rank, world = parallel.rank(), parallel.size()
    threads = parallel.configure_threads(cfg.threads if cfg.threads > 0 else None)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    clock.mark("dist_init")
    t0 = time.perf_counter()
    setup = setup_on_every_rank(cfg, paths)
    clock.mark("setup")
    reps = setup.reps
    if rank == 0:
        log.info("%d cases on %d rank(s), %d checkpoint(s) [%s], TTA %s, post-processing %s, %d thread(s)/rank, %s",
                 len(setup.cases), world, len(reps), ", ".join(f"{r.path}:{r.weight:.3g}" for r in reps),
                 "on" if cfg.tta else "off", "on" if cfg.postprocess.enabled else "off", threads, setup.device)
        if any(r.needs_clinical for r in reps):
            log.info("clinical records: %s", setup.clinical_source or "none found (all cases run image-only)")
    mine = partition(setup.cases, rank, world, voxel_counts(setup.cases, rank, world)) if world > 1 else setup.cases
    clock.mark("partition")
    rows = _predict_all(mine, setup, cfg, paths.out)
    clock.mark("cases")
    gathered = sorted((r for part in parallel.allgather_object(rows) for r in part), key=lambda r: r["case_id"])
    clock.mark("gather")
    problem = None
    if rank == 0:
        try:
            _write_summary(gathered, setup, cfg, paths, threads, time.perf_counter() - t0)
        except fsutil.DiskWriteError as e:
            problem = str(e)
    clock.mark("summary")
    problem = parallel.broadcast_object(problem)  # also the barrier: no rank leaves before the summary is written
    clock.mark("barrier")
    log.debug("phases rank=%d world=%d cases=%s %s", rank, world, ",".join(c.case_id for c in mine), clock.json())
    problem = problem or next((r["error"] for r in gathered if r.get("disk_full")), None)
    if problem:  # every rank raises the same one line (exit 4)
        raise PredictError(problem, code=EXIT_ENV)
    return EXIT_PARTIAL if any(r["status"] != "ok" for r in gathered) else 0


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hpc-dfs predict`` options: the paths, then every :class:`PredictConfig` setting as a flag."""
    parser.add_argument("--checkpoint", dest="checkpoints", action="append", type=Path, default=[], metavar="CKPT",
                        help="checkpoint (.pt) written by `hpc-dfs train`; repeat to average several replicas")
    parser.add_argument("--refine-checkpoint", dest="refine_checkpoints", action="append", type=Path, default=[],
                        metavar="CKPT", help="cascade: a stage-2 checkpoint (`hpc-dfs train --stage refine`); repeat "
                                             "to average several; without it predict runs stage 1 alone")
    parser.add_argument("--refine-weights", dest="cfg__refine_weights", default=None, metavar="W1,W2,...",
                        type=lambda s: [float(v) for v in s.split(",") if v.strip()],
                        help="one weight per --refine-checkpoint (default equal)")
    parser.add_argument("--oof", type=Path, default=None, metavar="RUN",
                        help="out-of-fold: a cross-validation run (`train --folds`); each fold's validation cases are "
                             "predicted by that fold's model (instead of --checkpoint)")
    parser.add_argument("--input", type=Path, default=None, metavar="PATH",
                        help="a case folder, a folder of case_XXXXX/ folders, one imaging.nii.gz, or an "
                             "nnU-Net v2 raw dataset (its imagesTs/, else imagesTr/)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (created)")
    parser.add_argument("--clinical", type=Path, default=None, metavar="JSON",
                        help="clinical records (KiTS schema); default: kits.json beside the cases")
    parser.add_argument("--weights", dest="cfg__weights", default=None, metavar="W1,W2,...",
                        type=lambda s: [float(v) for v in s.split(",") if v.strip()],
                        help="one weight per --checkpoint for the weighted average of probabilities (default equal)")
    parser.add_argument("--postprocess", dest="cfg__postprocess.enabled", action=argparse.BooleanOptionalAction,
                        default=None, help="connected-component post-processing (default on; "
                                           "fine-tune with --set postprocess.<key>=...)")
    cfgmod.add_arguments(parser, PredictConfig, skip=("weights", "refine_weights"))


def main(args: argparse.Namespace) -> int:
    """Read the settings and paths, check what needs no rank, and :func:`run`.

    Raises:
        ConfigError: a bad setting, ``--input``/``--out`` missing, or not one ``--weights`` per ``--checkpoint``.
    """
    cfg = cfgmod.from_args(PredictConfig, args)
    if not args.input or not args.out:
        raise cfgmod.ConfigError("--input and --out are required")
    if args.oof is not None and (args.checkpoints or args.refine_checkpoints or cfg.weights):
        raise cfgmod.ConfigError("--oof takes every fold's model from its run: give no --checkpoint, "
                                 "--refine-checkpoint or --weights with it")
    if not args.checkpoints and args.oof is None:
        raise PredictError("give at least one --checkpoint (or --oof RUN)")
    # a cross-validation run folder counts one checkpoint per fold: its weights are checked once expanded (setup)
    folders = any(p.is_dir() for p in args.checkpoints + args.refine_checkpoints)
    if not folders and cfg.weights and len(cfg.weights) != len(args.checkpoints):
        raise cfgmod.ConfigError(f"got {len(cfg.weights)} --weights for {len(args.checkpoints)} --checkpoint; give "
                                 f"one weight per checkpoint or none")
    if not folders and cfg.refine_weights and len(cfg.refine_weights) != len(args.refine_checkpoints):
        raise cfgmod.ConfigError(f"got {len(cfg.refine_weights)} --refine-weights for "
                                 f"{len(args.refine_checkpoints)} --refine-checkpoint")
    return run(cfg, PredictPaths(list(args.checkpoints), args.input, args.out, args.clinical,
                                 list(args.refine_checkpoints), oof=args.oof))
