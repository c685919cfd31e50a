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
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hpc_dfs import __version__
from hpc_dfs.config import require_path
from hpc_dfs.data.fingerprint import CasePart
from hpc_dfs.data.geometry import normalise
from hpc_dfs.data.plan import (CaseItem, PreprocessPlan, PreprocessError, available_memory, case_memory_need,
                                check_case_memory, load_item, make_plan, reusable_shard, source_sha)
from hpc_dfs.data.progress import add_progress_argument, progress_bar, wants_progress
from hpc_dfs.errors import EXIT_PARTIAL, HpcDfsError
from hpc_dfs.fsutil import DiskWriteError, clean_stale_tmp, write_json
from hpc_dfs.log import get_logger

__all__ = ["run_preprocess", "PreprocessError", "add_arguments", "main", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
CLI_LONG_HELP = True


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The verb's options: ``--data``, ``--out``, ``--fail-fast``, ``--progress`` and every preprocessing setting.

    Args:
        parser: the ``preprocess`` sub-parser.
    """
    from hpc_dfs.config import add_arguments as add_cfg
    from hpc_dfs.config.data import PreprocessConfig

    parser.add_argument("--data", required=True, type=Path, help="KiTS-layout input folder (case_XXXXX/, kits.json)")
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
class _Abort(HpcDfsError):
    """Raised inside the case loops to stop at the first bad case (--fail-fast); caught in run_preprocess."""

    code = 1


@dataclass
class _Rank:
    """This rank's view of the run: settings, where it writes, who it is, and the cases that failed here."""

    cfg: Any                         # PreprocessConfig
    out_dir: Path
    rank: int
    world: int
    log: logging.Logger
    fail_fast: bool
    failed: dict[str, str] = field(default_factory=dict)   # case id -> "[case_id] problem", this rank's
    bar: Any = None
    fit_rank: int = 0                # the rank that fits the clinical pipeline: the one with the least work
    clock: Any = None                # hpc_dfs.parallel.phases.PhaseClock: where this rank's seconds went

    def fail(self, cid: str, err: Exception) -> None:
        """Record and log one bad case as ``[case_id] problem``; under --fail-fast stop here."""
        msg = str(err) if str(err).startswith(f"[{cid}]") else f"[{cid}] {type(err).__name__}: {err}"
        self.failed[cid] = msg
        self.log.error("%s", msg)
        if self.fail_fast:
            raise _Abort(msg)


@dataclass
class _Local:
    """This rank's fingerprint pass: its valid cases' parts and input hashes, shards to reuse, items in memory."""

    parts: dict[str, CasePart] = field(default_factory=dict)
    shas: dict[str, str] = field(default_factory=dict)
    reused: dict[str, dict] = field(default_factory=dict)   # attrs of shards already made from the same inputs
    cache: dict[str, CaseItem] = field(default_factory=dict)
    cached_bytes: int = 0


@dataclass
class _Shared:
    """What every rank knows after the fingerprint exchange (identical on all of them)."""

    parts: dict[str, CasePart]       # every valid case's fingerprint part
    shas: dict[str, str]             # and the sha256 of its input files
    fingerprint: dict
    params: dict                     # the manifest's ``preprocessing`` block
    pipeline: Optional[dict]         # the fitted clinical pipeline as JSON, or None
    features: dict[str, np.ndarray]  # transformed clinical features by case
    risk: dict[str, Optional[int]]
    phash: str                       # hash of params + pipeline: a shard with another one is rewritten


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
    me = _start(Path(out_dir), cfg or PreprocessConfig(), fail_fast)
    me.clock = clock
    clock.mark("dist_init")
    t_start = time.time()  # after parallel.init() and imports: the logged time is the stage's own work
    plan = make_plan(Path(data_dir), me.cfg)                                           # 1. plan
    clock.mark("plan")
    errors = dict(plan.errors)
    _report_plan(me, plan)
    if errors and fail_fast:
        return _summary(me, errors)
    if not plan.readable():
        return _nothing_left(me, errors, f"no readable labelled case in {plan.data_dir}")
    spatial = fpm.spatial_fingerprint(plan.readable())  # the target spacing needs only headers
    sparams = fpm.spatial_params(spatial, me.cfg)
    _prepare_out(me)
    mine = _partition(me, plan)
    clock.mark("prepare_out+partition")
    me.bar = progress_bar(progress and me.rank == 0, total=2 * len(mine), desc=f"preprocess (rank 0 of {me.world})")
    try:
        local = _fingerprint_pass(me, plan, mine, sparams)                             # 2. fingerprint
    except _Abort:
        return _summary(me, me.failed, fail_fast=True)
    clock.mark("fingerprint")
    _warm_clinical(me, plan)
    clock.mark("sklearn_import")
    parts, shas = _exchange_parts(me, local, errors)
    clock.mark("exchange")
    if not parts:
        return _nothing_left(me, errors, f"no valid case to preprocess in {plan.data_dir}")
    shared = _derive(me, plan, spatial, parts, shas)
    clock.mark("derive+clinical")
    _retire_other_manifest(me, shared.phash)
    clock.mark("retire_manifest")
    try:
        results, n_reused = _write_pass(me, plan, mine, local, shared, sparams)         # 3. write
    except _Abort:
        return _summary(me, me.failed, fail_fast=True)
    except DiskWriteError as e:
        _stop_on_full_disk(me, e)
    me.bar.close()
    clock.mark("write")
    results, n_reused = _exchange_results(me, results, n_reused, errors)
    clock.mark("gather_results")
    if me.rank == 0:                                                                   # 4. manifest, last
        try:
            _write_manifest(me, plan, shared, results, errors, n_reused, t_start)
        except DiskWriteError as e:
            _stop_on_full_disk(me, e)
    clock.mark("manifest")
    parallel.barrier()
    clock.mark("barrier")
    _log_phases(me, plan, mine)
    return _summary(me, errors) if errors else 0


# ----------------------------------------------------------------------------- 1. plan
def _start(out_dir: Path, cfg, fail_fast: bool) -> _Rank:
    """Join the ranks (object collectives only) and give this rank its share of the cores."""
    from hpc_dfs import parallel

    parallel.init(horovod=False)  # ranks + object collectives only (mpi4py under MPI launchers)
    parallel.configure_threads()
    return _Rank(cfg, out_dir, parallel.rank(), parallel.size(), get_logger("hpc_dfs.preprocess"), fail_fast)


def _partition(me: _Rank, plan: PreprocessPlan) -> list[str]:
    """This rank's cases, balanced by voxels (largest first, deterministic); sets ``me.fit_rank``.

    The clinical pipeline is fitted by the rank left with the fewest voxels (ties: the highest rank, as the
    largest cases go to the lowest ranks first): its sklearn import (~1.5 s) then overlaps the others' work.
    """
    from hpc_dfs.data.reader import partition_balanced

    items = [(cid, (m or {}).get("n_voxels", 0)) for cid, m in plan.metas.items()]
    if me.world == 1:
        return partition_balanced(items, 0, 1)
    sizes = dict(items)
    shares = [partition_balanced(items, r, me.world) for r in range(me.world)]
    loads = [sum(sizes[cid] for cid in share) for share in shares]
    me.fit_rank = min(range(me.world), key=lambda r: (loads[r], -r))
    return shares[me.rank]


def _warm_clinical(me: _Rank, plan: PreprocessPlan) -> None:
    """On the rank that fits the clinical pipeline, import sklearn once its own cases are done (while others
    may still work), not at start-up on every rank."""
    if plan.frame is not None and me.rank == me.fit_rank:
        import sklearn.compose  # noqa: F401


def _log_phases(me: _Rank, plan: PreprocessPlan, mine: list[str]) -> None:
    """One DEBUG line per rank: its cases, their voxels, and the wall/CPU seconds of each phase."""
    voxels = sum((plan.metas.get(cid) or {}).get("n_voxels", 0) for cid in mine)
    me.log.debug("phases rank=%d world=%d fit_rank=%d cases=%s voxels=%d %s", me.rank, me.world, me.fit_rank,
                 ",".join(mine), voxels, me.clock.json())


def _report_plan(me: _Rank, plan: PreprocessPlan) -> None:
    """Rank 0 names the cases already known bad and those skipped for lack of ground truth."""
    if me.rank != 0:
        return
    for msg in plan.errors.values():
        me.log.error("%s", msg)
    if plan.skipped:
        me.log.warning("skipping %d case(s) without ground truth: %s", len(plan.skipped), ", ".join(plan.skipped))


def _prepare_out(me: _Rank) -> None:
    """Rank 0 creates the output folder and removes temporary files of an interrupted run; all ranks wait."""
    from hpc_dfs import parallel

    if me.rank == 0:
        me.out_dir.mkdir(parents=True, exist_ok=True)
        n_stale = clean_stale_tmp(me.out_dir)
        if n_stale:
            me.log.info("removed %d temporary file(s) left by an interrupted run", n_stale)
    parallel.barrier()


def _retire_other_manifest(me: _Rank, phash: str) -> None:
    """Rank 0 removes a ``manifest.json`` of other parameters before any shard is rewritten; all ranks wait.

    A rerun with changed settings replaces the shards one by one; killed half-way, the folder would hold the old
    manifest over shards of two settings. Without the manifest it reads as unfinished until
    the new one is written, last.
    """
    from hpc_dfs import parallel

    if me.rank == 0:
        path = me.out_dir / "manifest.json"
        try:
            old = json.loads(path.read_text()).get("params_sha256")
        except FileNotFoundError:
            old = phash
        except (OSError, ValueError, AttributeError):
            old = None
        if old != phash:
            path.unlink(missing_ok=True)
            me.log.info("%s was written with other parameters: removed before its shards are rewritten", path)
    parallel.barrier()


def _stop_on_full_disk(me: _Rank, err: DiskWriteError) -> None:
    """A full disk stops the run: one line naming the file (exit 4); under MPI the whole job is aborted.

    Raises:
        DiskWriteError: always (alone, or before the other ranks are aborted).
    """
    if me.world > 1:
        from hpc_dfs import parallel
        me.log.error("%s", err)
        parallel.abort(err.code)
    raise err


# ----------------------------------------------------------------------------- 2. fingerprint
def _fingerprint_pass(me: _Rank, plan: PreprocessPlan, mine: list[str], sparams: dict) -> _Local:
    """Load, validate and sample this rank's cases, or reuse their valid shards; keep items up to ``cache_mb``
    while the memory left still holds the largest case to come (:func:`_cache_fits`)."""
    local = _Local()
    needs = [(case_memory_need(plan.case_dirs[cid], sparams) or (0, ""))[0] for cid in mine]
    for i, cid in enumerate(mine):
        try:
            part, sha, reused, item = _fingerprint_case(me, plan, cid, sparams)
            if reused is not None:
                local.reused[cid] = reused
            if item is not None and _cache_fits(me, local, item, max(needs[i + 1:], default=0)):
                local.cache[cid] = item
                local.cached_bytes += item.nbytes
            local.parts[cid], local.shas[cid] = part, sha
        except Exception as e:  # CaseError, or anything unexpected about this case: still name it
            me.fail(cid, e)
        me.bar.update(1)
    return local


def _cache_fits(me: _Rank, local: _Local, item: CaseItem, need_next: int) -> bool:
    """Whether ``item`` may stay in memory: within ``cache_mb``, and the memory left holds the next case's need."""
    held = local.cached_bytes + item.nbytes
    if held > me.cfg.cache_mb * 2 ** 20:
        return False
    have, _ = available_memory(me.cfg.memory_limit_mb, _ranks_per_node())
    return have - (held if me.cfg.memory_limit_mb else 0) >= need_next  # the system's figure already counts it


def _ranks_per_node() -> int:
    from hpc_dfs import parallel

    return parallel.local_size()


def _fingerprint_case(me: _Rank, plan: PreprocessPlan, cid: str,
                      sparams: dict) -> tuple[CasePart, str, Optional[dict], Optional[CaseItem]]:
    """(part, input sha, attrs of a reusable shard or None, the loaded item or None) of one case."""
    from hpc_dfs.data import fingerprint as fpm
    from hpc_dfs.data.shards import shard_name

    cd, cfg = plan.case_dirs[cid], me.cfg
    sha = source_sha(cd)
    prev = reusable_shard(me.out_dir / shard_name(cid), cid, sha)
    if prev is not None:
        attrs, samples = prev
        return CasePart.from_meta(attrs["fingerprint_part"], samples), sha, attrs, None
    meta = plan.metas[cid]
    check_case_memory(cd, sparams, cfg.memory_limit_mb, _ranks_per_node())
    item, part = load_item(cd, plan.label_map, sparams, sample=lambda case: fpm.case_part(
        cid, case.image, case.label, meta["shape"], meta["spacing"], cfg.fg_samples_per_case, cfg.seed))
    return part, sha, None, item


def _exchange_parts(me: _Rank, local: _Local, errors: dict[str, str]) -> tuple[dict[str, CasePart], dict[str, str]]:
    """Every rank's parts and input hashes, on every rank; the failed cases are added to ``errors``."""
    from hpc_dfs import parallel

    gathered = parallel.allgather_object(
        ({cid: (p.meta(), p.fg_samples, local.shas[cid]) for cid, p in local.parts.items()}, me.failed),
        name="preprocess.fingerprint")
    parts: dict[str, CasePart] = {}
    shas: dict[str, str] = {}
    for rank_parts, rank_errors in gathered:
        errors.update(rank_errors)
        for cid, (meta, samples, sha) in rank_parts.items():
            parts[cid] = CasePart.from_meta(meta, samples)
            shas[cid] = sha
    return parts, shas


def _derive(me: _Rank, plan: PreprocessPlan, spatial: dict, parts: dict[str, CasePart],
            shas: dict[str, str]) -> _Shared:
    """The normalisation from the merged fingerprint, and the clinical pipeline fitted on the valid cases.

    Raises:
        PreprocessError: the fingerprint gives no usable parameters.
    """
    from hpc_dfs.data import kits_clinical as clin
    from hpc_dfs.data import fingerprint as fpm

    try:
        fingerprint = {**spatial, "foreground": fpm.intensity_fingerprint(parts.values(), me.cfg.percentiles)}
        params = fpm.derive_params(fingerprint, me.cfg, plan.classes, plan.label_map)
    except ValueError as e:
        raise PreprocessError(str(e)) from None
    valid_ids = sorted(parts)
    pipeline = _fit_clinical(me, plan, valid_ids)
    features = {cid: np.zeros(0, np.float32) for cid in valid_ids}
    if pipeline is not None:
        x = clin.ClinicalPipeline.from_json(pipeline).transform(plan.frame.loc[valid_ids])
        features = {cid: x[i] for i, cid in enumerate(valid_ids)}
    risk = {cid: clin.risk_label(plan.records[cid]) if cid in plan.records else None for cid in valid_ids}
    return _Shared(parts, shas, fingerprint, params, pipeline, features, risk, _params_hash(params, pipeline))


def _fit_clinical(me: _Rank, plan: PreprocessPlan, valid_ids: list[str]) -> Optional[dict]:
    """The clinical pipeline fitted on the valid cases, as JSON, on every rank; None without clinical records.

    One rank (``me.fit_rank``) fits it, the only one to import sklearn (~1.5 s of every rank's start-up
    otherwise), and sends the JSON; every rank, that one too, then transforms from the JSON, so the features
    are the same whatever the number of ranks (the transform reads only the fitted numbers, which JSON
    carries exactly).
    """
    from hpc_dfs import parallel
    from hpc_dfs.data import kits_clinical as clin

    if plan.frame is None:
        return None
    pipeline, problem = None, None
    if me.rank == me.fit_rank:
        try:
            pipeline = clin.ClinicalPipeline().fit(plan.frame.loc[valid_ids]).to_json()
        except Exception as e:  # the other ranks wait for the pipeline: they stop too, naming the problem
            problem = e
    if me.world > 1:
        pipeline, why = parallel.broadcast_object((pipeline, None if problem is None else repr(problem)),
                                              root=me.fit_rank, name="preprocess.clinical_pipeline")
        if why is not None and problem is None:
            raise PreprocessError(f"fitting the clinical pipeline failed on rank {me.fit_rank}: {why}")
    if problem is not None:
        raise problem
    return pipeline


def _params_hash(params: dict, pipeline: Optional[dict]) -> str:
    blob = json.dumps({"schema": SCHEMA_VERSION, "preprocessing": params, "clinical": pipeline}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- 3. write
def _write_pass(me: _Rank, plan: PreprocessPlan, mine: list[str], local: _Local, shared: _Shared,
                sparams: dict) -> tuple[dict[str, dict], int]:
    """Write the shards of this rank's valid cases; returns their manifest entries and how many were kept."""
    results: dict[str, dict] = {}
    n_reused = 0
    for cid in mine:
        if cid in shared.parts:
            try:
                results[cid], kept = _write_or_keep(me, plan, cid, local, shared, sparams)
                n_reused += kept
            except DiskWriteError:
                raise  # not this case's problem: every case after it would fail the same way
            except Exception as e:
                me.fail(cid, e)
        me.bar.update(1)
    return results, n_reused


def _write_or_keep(me: _Rank, plan: PreprocessPlan, cid: str, local: _Local, shared: _Shared,
                   sparams: dict) -> tuple[dict, bool]:
    """(manifest entry, kept): the shard is kept when it was made with the same parameters and risk label."""
    from hpc_dfs.data.shards import shard_name

    prev = local.reused.get(cid)
    risk = shared.risk[cid]
    if (prev is not None and prev.get("params_sha256") == shared.phash
            and prev.get("risk_label") == (-1 if risk is None else risk)):
        return prev["manifest_entry"], True
    item = local.cache.pop(cid, None)
    if item is None:  # beyond cache_mb (or a shard to redo): decoded again
        check_case_memory(plan.case_dirs[cid], sparams, me.cfg.memory_limit_mb, _ranks_per_node())
        item, _ = load_item(plan.case_dirs[cid], plan.label_map, sparams)
    return _write_case(me.out_dir / shard_name(cid), item, shared, me.cfg), False


def _write_case(shard: Path, item: CaseItem, shared: _Shared, cfg) -> dict:
    """Normalise one item and write its shard (atomically); returns its manifest entry."""
    from hpc_dfs.data.shards import write_case_shard

    cid = item.case_id
    risk, part, sha = shared.risk[cid], shared.parts[cid], shared.shas[cid]
    params, labels = shared.params, item.labels
    slices = normalise(item.hu, params["intensity"])
    present, slices_with = _present(labels, params["classes"])
    entry = {"case_id": cid, "shard": shard.name, "n_slices": int(len(slices)),
             "risk_label": risk, "n_voxels_in": int(np.prod(item.original_shape)), "slices_with": slices_with,
             "source_sha256": sha}
    refine = None
    if item.refine is not None:  # the cascade's stage-2 windows, normalised like the slices
        r = item.refine
        r_present, r_with = _present(r["label"], params["classes"])
        refine = {"image": normalise(r["hu"], params["intensity"]), "label": r["label"], "stack": r["stack"],
                  "classes_present": r_present, "boxes": r["boxes"]}
        entry.update({"n_refine_slices": int(len(r["label"])), "n_refine_windows": len(r["boxes"]),
                      "refine_slices_with": r_with})
    attrs = {
        "case_id": cid, "original_shape": [int(v) for v in item.original_shape],
        "spacing": [float(v) for v in item.spacing], "affine": np.asarray(item.affine).tolist(),
        "orientation": "".join(item.geometry["codes"]), "source_sha256": sha,
        "risk_label": -1 if risk is None else int(risk), "preprocessing": json.dumps(params, sort_keys=True),
        "geometry": item.geometry, "params_sha256": shared.phash, "fingerprint_part": part.meta(),
        "manifest_entry": entry, "source_files": item.source_files,
    }
    write_case_shard(shard, cid, slices, labels, present, shared.features[cid], part.fg_samples, attrs,
                     compression=cfg.compression, level=cfg.compression_level, refine=refine)
    return entry


def _present(labels: np.ndarray, classes: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """(n, C) 1 where class c occurs in slice i, and the count of slices holding each foreground class."""
    # any() over the slice axes, not reshape(n, -1): a case without kidney has n = 0 stage-2 slices
    present = np.stack([(labels == c).any(axis=(1, 2)) for c in range(len(classes))], axis=1)
    return present, {name: int(present[:, c].sum()) for c, name in enumerate(classes) if c > 0}


def _exchange_results(me: _Rank, results: dict[str, dict], n_reused: int,
                      errors: dict[str, str]) -> tuple[dict[str, dict], int]:
    """Every rank's manifest entries and kept-shard count; the failed cases are added to ``errors``."""
    from hpc_dfs import parallel

    gathered = parallel.allgather_object((results, me.failed, n_reused), name="preprocess.results")
    all_results: dict[str, dict] = {}
    total_reused = 0
    for rank_results, rank_errors, rank_reused in gathered:
        all_results.update(rank_results)
        errors.update(rank_errors)
        total_reused += rank_reused
    return all_results, total_reused


# ----------------------------------------------------------------------------- 4. manifest
def _write_manifest(me: _Rank, plan: PreprocessPlan, shared: _Shared, results: dict[str, dict], errors: dict[str, str],
                    n_reused: int, t_start: float) -> None:
    """Rank 0: ``clinical_pipeline.json``, then ``manifest.json`` (CONTRACTS.md section 2), then one log line."""
    from hpc_dfs.config import to_dict

    cfg = me.cfg
    folds = _assign_folds(list(plan.case_dirs), cfg.n_folds, cfg.seed)
    cases = [dict(results[cid], fold=folds[cid]) for cid in sorted(results)]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "hpc_dfs_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": plan.dataset,
        "source": str(plan.data_dir.resolve()),
        "shards": [c["shard"] for c in cases],
        "cases": cases,
        "n_folds": cfg.n_folds,
        "fingerprint": shared.fingerprint,
        "preprocessing": shared.params,
        "clinical": _clinical_block(me.out_dir, plan, shared.pipeline),
        "config": to_dict(cfg),
        "failed": [{"case_id": k, "error": v} for k, v in sorted(errors.items())],
        "skipped_unlabelled": plan.skipped,
        "world_size": me.world,
        "params_sha256": shared.phash,
    }
    write_json(me.out_dir / "manifest.json", manifest)
    n_in = sum(c["n_voxels_in"] for c in cases)
    me.log.info("wrote %s: %d case(s) (%d preprocessed, %d already valid) in %.1f s on %d rank(s), %.1f Mvoxels in",
                me.out_dir / "manifest.json", len(cases), len(cases) - n_reused, n_reused, time.time() - t_start,
                me.world, n_in / 1e6)


def _assign_folds(case_ids: list[str], n_folds: int, seed: int) -> dict[str, int]:
    """Folds by case: a seeded permutation of the sorted ids, dealt round-robin."""
    ids = sorted(case_ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: int(i % n_folds) for i, j in enumerate(perm)}


def _clinical_block(out_dir: Path, plan: PreprocessPlan, pipeline: Optional[dict]) -> dict:
    """The manifest's ``clinical`` block; writes ``clinical_pipeline.json`` when there is a pipeline."""
    from hpc_dfs.data.kits_clinical import ClinicalPipeline

    if pipeline is None:
        return {"pipeline_file": None, "n_features": 0, "feature_names": [], "target": "malignant", "source": None}
    write_json(out_dir / "clinical_pipeline.json", pipeline)
    names = ClinicalPipeline.from_json(pipeline).feature_names()
    return {"pipeline_file": "clinical_pipeline.json", "n_features": len(names), "feature_names": names,
            "target": "malignant", "source": plan.clinical_file.name}


# ----------------------------------------------------------------------------- ending
def _nothing_left(me: _Rank, errors: dict[str, str], what: str) -> int:
    """No case left to work on: the failed cases' summary (status 1) or, when none failed, an error (status 2).

    Raises:
        PreprocessError: no case failed, so the folder itself is the problem.
    """
    if not errors:
        raise PreprocessError(what)
    if me.rank == 0:
        me.log.error("%s", what)
    return _summary(me, errors)


def _summary(me: _Rank, errors: dict[str, str], fail_fast: bool = False) -> int:
    """Log the failed cases (rank 0, or the failing rank under --fail-fast) and return ``EXIT_PARTIAL`` (1)."""
    if me.rank == 0 or fail_fast:
        lines = "\n".join(f"  {v}" for _, v in sorted(errors.items()))
        me.log.error("%d case(s) failed%s:\n%s", len(errors), " (stopped at the first: --fail-fast)" if fail_fast else
                     "; the other cases were written", lines)
    if fail_fast and me.world > 1:
        from hpc_dfs import parallel
        parallel.abort(EXIT_PARTIAL)
    return EXIT_PARTIAL
