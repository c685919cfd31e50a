"""Train the DFS fusion model data-parallel with Horovod ring-allreduce or torch.distributed (1..N ranks, CPU or GPU).

The same command runs as one process, under ``horovodrun`` (Gloo or MPI), under ``mpirun`` and under
``srun`` in an sbatch allocation, and under ``torchrun`` (the torch engine, :mod:`hpc_dfs.parallel.torch_backend`)::

    hpc-dfs train --shards data/shards --out runs/r1                          # one process
    horovodrun -np 4 --gloo hpc-dfs train --shards data/shards --out runs/r1  # Gloo controller
    mpirun -np 4 hpc-dfs train --shards data/shards --out runs/r1             # MPI controller
    srun --mpi=pmix hpc-dfs train --shards data/shards --out runs/r1          # inside sbatch (slurm/)
    torchrun --nproc_per_node 4 -m hpc_dfs train --shards data/shards --out runs/r1   # the torch engine
    mpirun -np 4 hpc-dfs train --engine torch --shards data/shards --out runs/r1      # torch engine, MPI launch
    hpc-dfs train --shards data/shards --out runs/r1 --resume                 # continue from last.pt
    hpc-dfs train --shards data/shards --out runs/r1 --auto-resume            # resume if last.pt exists (sbatch)
    hpc-dfs train --shards data/shards --out runs/r1 --set optim.lr=1e-3 --set schedule.val_every=5
    mpirun -np 4 hpc-dfs train --shards data/shards --out runs/cv --folds all     # every fold: runs/cv/fold_K
    hpc-dfs train --shards data/shards --out runs/cv --folds 0,2 --auto-resume  # some folds; finished ones skipped
    hpc-dfs train --shards kits23/shards --out runs/k23 --stage both --set loss.regions=kits23  # KiTS23 regions

KiTS23 shards hold 4 classes (background, kidney, tumour, cyst); the default learns them with one softmax,
``loss.regions=kits23`` learns nnU-Net's KiTS23 regions instead (:mod:`hpc_dfs.data.regions`).

Small settings for a laptop or CI (2 ranks on 2 cores; on 64x64 phantom shards of 8 cases this
reaches kidney Dice ~0.85 in about 75 s)::

    mpirun --allow-run-as-root --oversubscribe -np 2 hpc-dfs train --shards S --out R --epochs 30 \\
        --batch-size 8 --lr 0.002 --num-workers 0 --set model.base_channels=8 --set model.norm=instance

On CPU prefer ``model.norm=instance`` (batch-independent): the rank-synchronised BatchNorm adds two
small blocking allreduces per BatchNorm layer and step, which on CPU cost more than they buy
(2 ranks on 2 cores: 1.46x the 1-rank throughput with it, 1.9-2.0x with instance norm).

The DFS algorithm, step by step, is :meth:`hpc_dfs.training.trainer.Trainer.train` (its
``train_step`` does 2-3):

1. the training slices are partitioned over the P ranks: every global batch (drawn from
   ``(seed, epoch)``, independent of P) is cut into P contiguous shares;
2. each rank runs the segmentation, clinical and fusion forward pass and the loss on its share;
   the loss's sufficient statistics are summed over ranks first (a differentiable allreduce), so the
   loss is the global batch's loss on every rank;
3. gradients are averaged by Horovod's ring-allreduce (``hvd.DistributedOptimizer``), or by the torch
   engine's allreduce with the same protocol and arithmetic (``--engine torch``);
4. weights are broadcast from rank 0 at the start, weights and optimizer state on resume.

Why the gradients equal the single-process ones: every rank holds the same loss ``L`` of the global
batch. Horovod's sum-allreduce has a sum-allreduce as its backward, so rank r's gradient is
``P * dL/dS * dS_r/dtheta`` (S = the summed statistics, S_r = rank r's share). Averaging over the P
ranks gives ``sum_r dL/dS * dS_r/dtheta = dL/dtheta``: no extra scaling. BatchNorm layers are
replaced by a rank-synchronised batch norm built the same way (:mod:`hpc_dfs.parallel.syncbn`), so a
2-rank run reproduces a 1-rank run with the same global batch (``tests/distributed/test_train_distributed.py``).
How closely is :data:`RANK_INVARIANCE` (also printed by ``hpc-dfs train --help``).

Exit status: 0 done; 2 bad configuration or data (reported before any work);
75 (:data:`~hpc_dfs.errors.EXIT_PREEMPTED`) stopped by SIGUSR1/SIGTERM after writing
``last.pt`` -- requeue with ``--resume`` (or always pass ``--auto-resume``); 1 any other error (the job is
aborted on all ranks).

Outputs (CONTRACTS.md section 3): ``RUN/checkpoints/{last,best,epoch_XXXX}.pt``, ``RUN/metrics.jsonl``,
``RUN/run.json`` (what ran), ``RUN/curves.png``, ``RUN/config.toml``, and optionally ``RUN/tb/`` (TensorBoard)
and a Horovod timeline. With ``--folds`` each fold is such a run in ``RUN/fold_K/`` (:mod:`hpc_dfs.training.folds`),
beside ``RUN/fold_K/fold.json`` and ``RUN/cv.json`` (the folds' best validation metrics).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from hpc_dfs import parallel
from hpc_dfs.config import add_arguments as add_config_arguments, from_args
from hpc_dfs.config.train import TrainConfig
from hpc_dfs.contracts import checkpoint as ckpt, run as run_contract
from hpc_dfs.errors import HpcDfsError
from hpc_dfs.fsutil import lock_folder, unlock_folder
from hpc_dfs.log import get_logger
from hpc_dfs.training.folds import train_folds
from hpc_dfs.training.plan import SetupError, checked, engine_for, model_kwargs, prepare
from hpc_dfs.training.trainer import Trainer

__all__ = ["add_arguments", "main", "train"]

RANK_INVARIANCE = """\
Rank invariance: with --deterministic and a fixed --global-batch-size, N ranks reach the 1-rank weights.
Tested at 2 ranks on 32x32 shards (base width 4, global batch 4), relative difference of the whole weights:
  - below 1e-5 after 4 steps with --optimizer sgd --set model.dropout=0;
  - below 1e-3 after 8 steps with the defaults (Adam, dropout 0.2, augmentation; measured 1.4e-7): dropout
    masks and augmentation are drawn from (seed, step or epoch, global sample index), not from the rank.
What remains is float32 summation order, which grows with steps and image size (64x64, base width 8,
8 steps: 2.7e-5 with the defaults, 5.6e-5 with SGD) and which Adam can turn into full-size steps for
parameters whose gradient is near zero.
Without --deterministic, dropout draws from each rank's own RNG stream (the batches are still the same).
Tested in tests/distributed/test_train_distributed.py at 2 ranks."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, required=True, help="SHARDS folder written by `hpc-dfs preprocess`")
    parser.add_argument("--out", type=Path, required=True, help="RUN folder (checkpoints, metrics, curves)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue from RUN/checkpoints/last.pt if it exists, else start (for requeued jobs)")
    parser.add_argument("--folds", default=None, metavar="all|K,K,...",
                        help="cross-validation: train these manifest folds one after the other, fold K (validated on "
                             "fold K, schedule.val_fold=K) into RUN/fold_K; with --resume/--auto-resume finished "
                             "folds are skipped and started ones resumed")
    add_config_arguments(parser, TrainConfig)
    parser.epilog = RANK_INVARIANCE


def main(args: argparse.Namespace) -> int:
    """``hpc-dfs train``: settings, Horovod's environment, ``parallel.init()``, then :func:`train`.

    Raises:
        ConfigError: a bad setting (before any rank starts work; exit 2).
        HpcDfsError: a problem met while training, e.g. ``DiskWriteError`` (exit 4) naming the file being
            written; with several ranks the line is logged and the job aborted with its code.
    """
    cfg = from_args(TrainConfig, args)
    cfg = dataclasses.replace(cfg, engine=engine_for(cfg))   # recorded in config.toml and the checkpoint
    _horovod_environment(cfg)
    parallel.init(engine=cfg.engine, timeout_s=cfg.horovod.stall_timeout)
    log = get_logger("hpc_dfs.train")
    try:
        if args.folds is not None:
            return train_folds(cfg, args.shards, args.out, args.folds, args.resume or args.auto_resume, train)
        first = run_contract.stage_dirs(args.out)["locate"] if cfg.stage == "both" else args.out   # both: locate
        resume = args.resume or (args.auto_resume and ckpt.last_path(first).is_file())
        return train(cfg, args.shards, args.out, resume=resume)
    except SetupError as e:   # every rank agreed, and rank 0 logged each problem
        return e.code
    except HpcDfsError as e:  # e.g. a full disk while writing a checkpoint: cli.main prints its one line
        if parallel.size() > 1:
            log.error("hpc-dfs train: error: %s", e)
            parallel.abort(e.code)  # the other ranks would wait forever in their next collective
        raise
    except Exception:
        log.exception("training failed")
        if parallel.size() > 1:
            parallel.abort(1)  # the other ranks would wait forever in their next collective
        return 1


def train(cfg: TrainConfig, shards_dir: Path, out: Path, resume: bool = False) -> int:
    """Check the inputs on every rank, build the :class:`~hpc_dfs.training.trainer.Trainer`, run it.

    ``--stage both`` trains the cascade's two stages one after the other, into ``RUN/locate`` and
    ``RUN/refine`` (a resumed run skips a stage whose ``last.pt`` says it finished).

    Returns:
        0 when done, :data:`EXIT_PREEMPTED` after a preemption checkpoint.

    Raises:
        SetupError: a bad setting, shard or checkpoint, on every rank (rank 0 logged it).
    """
    shards_dir, out = Path(shards_dir), Path(out)
    log = get_logger("hpc_dfs.train")
    lock = checked(log, "cannot train into --out", lambda: parallel.is_main() and lock_folder(out, "hpc-dfs train"))
    try:   # --out is held by this run until it ends (CONTRACTS.md, "what a lock means")
        return _train_stages(cfg, shards_dir, out, resume, log)
    finally:
        if lock:
            unlock_folder(lock)


def _train_stages(cfg: TrainConfig, shards_dir: Path, out: Path, resume: bool, log) -> int:
    if cfg.stage != "both":
        return _train_stage(cfg, shards_dir, out, resume)
    for stage in ("locate", "refine"):
        sub, sub_out = dataclasses.replace(cfg, stage=stage), out / stage
        if resume and _finished(sub_out, sub):
            log.info("stage %s: %s already finished its %d epochs; skipped", stage, sub_out, sub.schedule.epochs)
            continue
        rc = _train_stage(sub, shards_dir, sub_out, resume and ckpt.last_path(sub_out).exists())
        if rc:
            return rc
    return 0


def _train_stage(cfg: TrainConfig, shards_dir: Path, out: Path, resume: bool) -> int:
    log = get_logger("hpc_dfs.train")
    plan = checked(log, "bad configuration", lambda: prepare(cfg, shards_dir, out, resume))
    plan.model_kwargs = checked(log, "bad configuration", lambda: model_kwargs(cfg, plan.manifest))
    return Trainer(cfg, plan, shards_dir, out, resume=resume).train()


def _finished(out: Path, cfg: TrainConfig) -> bool:
    """``RUN/checkpoints/last.pt`` records all the epochs asked for (a second ``--stage both --resume``)."""
    last = ckpt.last_path(out)
    if not last.exists():
        return False
    return int(ckpt.read_meta(last).get("epoch", 0)) >= cfg.schedule.epochs


def _horovod_environment(cfg: TrainConfig) -> None:
    """Environment Horovod and Open MPI read at init (a value already set wins, except the timeline's)."""
    h = cfg.horovod
    # stall shutdown turns a dead or hung rank into an error, not a hang
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(5, h.stall_timeout // 2)))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(h.stall_timeout))
    if not torch.cuda.is_available():
        # CPU ranks share the node's cores with MPI's progress loop and Horovod's background thread: let idle
        # waits yield the core (measured, 2 ranks on 2 cores, instance norm: 1.7-1.8x the 1-rank throughput
        # instead of 1.1-1.3x with busy polling); a 1 ms cycle keeps the many small blocking allreduces of
        # the CPU SyncBatchNorm short. A value set in the environment wins.
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "1")
    if h.timeline:   # Horovod's timeline (chrome://tracing JSON), written by rank 0 from init to exit
        Path(h.timeline).resolve().parent.mkdir(parents=True, exist_ok=True)
        os.environ["HOROVOD_TIMELINE"] = str(Path(h.timeline).resolve())
    if h.autotune:
        os.environ["HOROVOD_AUTOTUNE"] = "1"
        if h.autotune_log:
            os.environ["HOROVOD_AUTOTUNE_LOG"] = str(h.autotune_log)
