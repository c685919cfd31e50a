"""``hpc-dfs preprocess``: KiTS-layout CT + clinical records -> verified HDF5 shards and manifest.json, over MPI ranks.

    hpc-dfs preprocess --data DATA --out SHARDS [--config FILE] [--slice-size 256,256] [--fail-fast]
    mpirun -np 4 hpc-dfs preprocess --data DATA --out SHARDS        # or srun, horovodrun --gloo

Four steps, every rank running the same code (``hpc_dfs.parallel`` gives rank and size):

1. **plan** (:func:`hpc_dfs.data.plan.make_plan`, no communication): list the cases; read the clinical
   records (only pre-operative fields become inputs) and check them; read every image header (cheap):
   voxel counts weigh the cases, and spacings and fields of view give the target spacing before any
   volume is decoded. The cases are split across ranks balanced by voxels
   (:func:`hpc_dfs.data.reader.partition_balanced`);
2. **fingerprint**: each rank loads and validates its cases, samples their foreground voxels and
   resamples them (kept in memory up to ``cache_mb`` so most cases are decoded once); the samples
   are gathered and combined in case-id order, so every rank derives the same normalisation
   whatever the number of ranks; the clinical pipeline (impute/scale/one-hot) is fitted on the valid
   training cases by one rank (the one with the fewest voxels; only it imports sklearn) and sent to the
   others as JSON, from which every rank computes the features;
3. **write**: each rank writes one shard per case (``shard-<case_id>.h5``, atomically), skipping cases
   whose shard is already valid for the same inputs and parameters (resume after a crash);
4. **manifest**: rank 0 gathers the results and writes ``clinical_pipeline.json`` then ``manifest.json``.

With ``HPC_DFS_LOG_LEVEL=DEBUG`` every rank logs one ``phases`` line: its cases, their voxels and the wall and
CPU seconds of each step from the process's start (:mod:`hpc_dfs.parallel.phases`).

A bad case (missing imaging, truncated gzip, shape or affine mismatch, labels outside the set,
non-finite voxels, missing or malformed clinical record) is reported once as
``[case_00007] problem``, nothing is written for it, the other cases are still done, and the exit
status is 1 with a summary of the failed cases. ``--fail-fast`` stops at the first one. An unusable
input folder or setting (no case folders, no clinical records) is one error line and exit status 2.

The per-case transform (``prepare_image``, ``prepare_label``) and its inverse (``restore_volume``) live in
:mod:`hpc_dfs.data.geometry`; ``predict`` uses them with the manifest's ``preprocessing`` block to reproduce
training exactly. The plan, the case loading and the resume check are in :mod:`hpc_dfs.data.plan`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from hpc_dfs.config import require_path
from hpc_dfs.data.plan import PreprocessError, make_plan
from hpc_dfs.data.preprocess_passes import (derive, exchange_parts, exchange_results, fingerprint_pass, write_pass,
                                            write_run_manifest)
from hpc_dfs.data.preprocess_rank import (PreprocessAbort, failed_summary, log_phases, nothing_left, partition_cases,
                                          prepare_out, report_plan, retire_other_manifest, start_rank,
                                          stop_on_full_disk, warm_clinical)
from hpc_dfs.data.progress import add_progress_argument, progress_bar, wants_progress
from hpc_dfs.fsutil import DiskWriteError

__all__ = ["run_preprocess", "PreprocessError", "add_arguments", "main"]
CLI_LONG_HELP = True


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The verb's options: ``--data``, ``--out``, ``--fail-fast``, ``--progress`` and every preprocessing setting.

    Args:
        parser: the ``preprocess`` sub-parser.
    """
    from hpc_dfs.config import add_arguments as add_cfg
    from hpc_dfs.config.data import PreprocessConfig

    parser.add_argument("--data", required=True, type=Path, help="KiTS-layout input folder (case_XXXXX/, kits.json) "
                        "or an nnU-Net v2 raw dataset (dataset.json, imagesTr/, labelsTr/)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for shards and manifest.json")
    add_progress_argument(parser)
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first bad case (default: do the "
                        "others and report all at the end)")
    add_cfg(parser, PreprocessConfig)


def main(args: argparse.Namespace) -> int:
    """Check the path arguments and run :func:`run_preprocess` with the settings they give.

    Args:
        args: the parsed ``preprocess`` arguments.

    Returns:
        The exit status: 0, or 1 when some cases failed.

    Raises:
        ConfigError: a bad setting, ``--data`` is not a folder, or ``--out`` is a file.
        PreprocessError: see :func:`run_preprocess`.
    """
    from hpc_dfs.config import from_args
    from hpc_dfs.config.data import PreprocessConfig

    cfg = from_args(PreprocessConfig, args)
    require_path(args.data, "dir", "--data")
    if args.out.exists():
        require_path(args.out, "dir", "--out")
    return run_preprocess(args.data, args.out, cfg, fail_fast=args.fail_fast, progress=wants_progress(args))


# ----------------------------------------------------------------------------- the stage


def run_preprocess(data_dir: str | Path, out_dir: str | Path, cfg=None, fail_fast: bool = False,
                   progress: bool = False) -> int:
    """Run the preprocessing stage on this rank (call under mpirun for several): plan, fingerprint, write, manifest.

    Args:
        data_dir: the KiTS-layout input folder.
        out_dir: the shard folder (created); resumable.
        cfg: a :class:`~hpc_dfs.config.data.PreprocessConfig` (default settings without one).
        fail_fast: stop at the first bad case.
        progress: a tqdm bar on rank 0.

    Returns:
        0, or 1 when some cases failed (listed in the manifest's ``failed``; with ``fail_fast`` no manifest).

    Raises:
        PreprocessError: no usable case folder, clinical file or setting (exit status 2).
    """
    from hpc_dfs import parallel
    from hpc_dfs.config.data import PreprocessConfig
    from hpc_dfs.data import fingerprint as fpm
    from hpc_dfs.parallel.phases import PhaseClock

    clock = PhaseClock()
    clock.mark("start+imports")
    me = start_rank(Path(out_dir), cfg or PreprocessConfig(), fail_fast)
    me.clock = clock
    clock.mark("dist_init")
    t_start = time.time()  # after parallel.init() and imports: the logged time is the stage's own work
    plan = make_plan(Path(data_dir), me.cfg)                                           # 1. plan
    clock.mark("plan")
    errors = dict(plan.errors)
    report_plan(me, plan)
    if errors and fail_fast:
        return failed_summary(me, errors)
    if not plan.readable():
        return nothing_left(me, errors, f"no readable labelled case in {plan.data_dir}")
    spatial = fpm.spatial_fingerprint(plan.readable())  # the target spacing needs only headers
    sparams = fpm.spatial_params(spatial, me.cfg)
    prepare_out(me)
    mine = partition_cases(me, plan)
    clock.mark("prepare_out+partition")
    me.bar = progress_bar(progress and me.rank == 0, total=2 * len(mine), desc=f"preprocess (rank 0 of {me.world})")
    try:
        local = fingerprint_pass(me, plan, mine, sparams)                             # 2. fingerprint
    except PreprocessAbort:
        return failed_summary(me, me.failed, fail_fast=True)
    clock.mark("fingerprint")
    warm_clinical(me, plan)
    clock.mark("sklearn_import")
    parts, shas = exchange_parts(me, local, errors)
    clock.mark("exchange")
    if not parts:
        return nothing_left(me, errors, f"no valid case to preprocess in {plan.data_dir}")
    shared = derive(me, plan, spatial, parts, shas)
    clock.mark("derive+clinical")
    retire_other_manifest(me, shared.phash)
    clock.mark("retire_manifest")
    try:
        results, n_reused = write_pass(me, plan, mine, local, shared, sparams)         # 3. write
    except PreprocessAbort:
        return failed_summary(me, me.failed, fail_fast=True)
    except DiskWriteError as e:
        stop_on_full_disk(me, e)
    me.bar.close()
    clock.mark("write")
    results, n_reused = exchange_results(me, results, n_reused, errors)
    clock.mark("gather_results")
    if me.rank == 0:                                                                   # 4. manifest, last
        try:
            write_run_manifest(me, plan, shared, results, errors, n_reused, t_start)
        except DiskWriteError as e:
            stop_on_full_disk(me, e)
    clock.mark("manifest")
    parallel.barrier()
    clock.mark("barrier")
    log_phases(me, plan, mine)
    return failed_summary(me, errors) if errors else 0


# ----------------------------------------------------------------------------- 3. write


