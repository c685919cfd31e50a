"""One rank's part in ``hpc-dfs preprocess`` (:class:`Rank`): its share of the cases, its start, and its ending.

The stage driver (``hpc_dfs/stages/preprocess.py``) runs the four steps; the passes over the cases are
:mod:`hpc_dfs.data.preprocess_passes`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_dfs.contracts.shards import manifest_path
from hpc_dfs.data.plan import PreprocessError, PreprocessPlan
from hpc_dfs.errors import EXIT_PARTIAL, HpcDfsError
from hpc_dfs.log import get_logger
from hpc_dfs.fsutil import DiskWriteError, clean_stale_tmp

__all__ = ["PreprocessAbort", "Rank", "start_rank", "partition_cases", "warm_clinical", "log_phases", "report_plan",
           "prepare_out", "retire_other_manifest", "stop_on_full_disk", "nothing_left", "failed_summary"]


class PreprocessAbort(HpcDfsError):
    """Raised inside the case loops to stop at the first bad case (--fail-fast); caught in run_preprocess."""

    code = 1


@dataclass
class Rank:
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
            raise PreprocessAbort(msg)


def start_rank(out_dir: Path, cfg, fail_fast: bool) -> Rank:
    """Join the ranks (object collectives only) and give this rank its share of the cores."""
    from hpc_dfs import parallel

    parallel.init(horovod=False)  # ranks + object collectives only (mpi4py under MPI launchers)
    parallel.configure_threads()
    return Rank(cfg, out_dir, parallel.rank(), parallel.size(), get_logger("hpc_dfs.preprocess"), fail_fast)


def partition_cases(me: Rank, plan: PreprocessPlan) -> list[str]:
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


def warm_clinical(me: Rank, plan: PreprocessPlan) -> None:
    """On the rank that fits the clinical pipeline, import sklearn once its own cases are done (while others
    may still work), not at start-up on every rank."""
    if plan.frame is not None and me.rank == me.fit_rank:
        import sklearn.compose  # noqa: F401


def log_phases(me: Rank, plan: PreprocessPlan, mine: list[str]) -> None:
    """One DEBUG line per rank: its cases, their voxels, and the wall/CPU seconds of each phase."""
    voxels = sum((plan.metas.get(cid) or {}).get("n_voxels", 0) for cid in mine)
    me.log.debug("phases rank=%d world=%d fit_rank=%d cases=%s voxels=%d %s", me.rank, me.world, me.fit_rank,
                 ",".join(mine), voxels, me.clock.json())


def report_plan(me: Rank, plan: PreprocessPlan) -> None:
    """Rank 0 names the cases already known bad and those skipped for lack of ground truth."""
    if me.rank != 0:
        return
    for msg in plan.errors.values():
        me.log.error("%s", msg)
    if plan.skipped:
        me.log.warning("skipping %d case(s) without ground truth: %s", len(plan.skipped), ", ".join(plan.skipped))


def prepare_out(me: Rank) -> None:
    """Rank 0 creates the output folder and removes temporary files of an interrupted run; all ranks wait."""
    from hpc_dfs import parallel

    if me.rank == 0:
        me.out_dir.mkdir(parents=True, exist_ok=True)
        n_stale = clean_stale_tmp(me.out_dir)
        if n_stale:
            me.log.info("removed %d temporary file(s) left by an interrupted run", n_stale)
    parallel.barrier()


def retire_other_manifest(me: Rank, phash: str) -> None:
    """Rank 0 removes a ``manifest.json`` of other parameters before any shard is rewritten; all ranks wait.

    A rerun with changed settings replaces the shards one by one; killed half-way, the folder would hold the old
    manifest over shards of two settings. Without the manifest it reads as unfinished until
    the new one is written, last.
    """
    from hpc_dfs import parallel

    if me.rank == 0:
        path = manifest_path(me.out_dir)
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


def stop_on_full_disk(me: Rank, err: DiskWriteError) -> None:
    """A full disk stops the run: one line naming the file (exit 4); under MPI the whole job is aborted.

    Raises:
        DiskWriteError: always (alone, or before the other ranks are aborted).
    """
    if me.world > 1:
        from hpc_dfs import parallel
        me.log.error("%s", err)
        parallel.abort(err.code)
    raise err


def nothing_left(me: Rank, errors: dict[str, str], what: str) -> int:
    """No case left to work on: the failed cases' summary (status 1) or, when none failed, an error (status 2).

    Raises:
        PreprocessError: no case failed, so the folder itself is the problem.
    """
    if not errors:
        raise PreprocessError(what)
    if me.rank == 0:
        me.log.error("%s", what)
    return failed_summary(me, errors)


def failed_summary(me: Rank, errors: dict[str, str], fail_fast: bool = False) -> int:
    """Log the failed cases (rank 0, or the failing rank under --fail-fast) and return ``EXIT_PARTIAL`` (1)."""
    if me.rank == 0 or fail_fast:
        lines = "\n".join(f"  {v}" for _, v in sorted(errors.items()))
        me.log.error("%d case(s) failed%s:\n%s", len(errors), " (stopped at the first: --fail-fast)" if fail_fast else
                     "; the other cases were written", lines)
    if fail_fast and me.world > 1:
        from hpc_dfs import parallel
        parallel.abort(EXIT_PARTIAL)
    return EXIT_PARTIAL
