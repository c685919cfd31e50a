"""Where the ranks wait and who does the serial work: quiet MPI waits, the phase clock, preprocess's fit rank."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

from hpc_dfs.parallel import backends
from hpc_dfs.parallel.phases import PhaseClock, process_start
from hpc_dfs.data import preprocess_rank as pre


class _FakeMPI:
    SUM, MIN, MAX, COMM_TYPE_SHARED = "sum", "min", "max", "shared"


class _Request:
    def __init__(self, comm, n_false):
        self.comm, self.left = comm, n_false

    def Test(self):
        self.comm.calls.append(("test",))
        self.left -= 1
        return self.left < 0


class _MPI3Comm:
    """A 2-rank COMM_WORLD with Ibarrier, whose barrier completes after ``n_false`` tests."""

    def __init__(self, n_false=3):
        self.n_false, self.calls = n_false, []

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def Split_type(self, kind):
        self.calls.append(("split",))
        return self

    def Ibarrier(self):
        self.calls.append(("ibarrier",))
        return _Request(self, self.n_false)

    def Barrier(self):  # the busy-polling blocking barrier: must not be used when Ibarrier exists
        self.calls.append(("Barrier",))

    def bcast(self, obj, root):
        self.calls.append(("bcast", root))
        return obj

    def allgather(self, obj):
        self.calls.append(("allgather",))
        return [obj, obj]

    def Allreduce(self, arr, out, op):
        self.calls.append(("allreduce",))
        out[:] = 2 * arr


def _kinds(comm):
    return [c[0] for c in comm.calls]


def test_collectives_first_wait_on_a_tested_ibarrier_and_never_block_in_barrier():
    comm = _MPI3Comm(n_false=3)
    b = backends.MpiObjectsBackend(comm, _FakeMPI)
    assert _kinds(comm) == ["ibarrier", "test", "test", "test", "test", "split"]
    for call, last in ((lambda: b.barrier(), "test"), (lambda: b.broadcast_object(1, 0, None), "bcast"),
                       (lambda: b.allgather_object(1, None), "allgather"),
                       (lambda: b.allreduce_array(np.ones(1), "sum", None), "allreduce")):
        comm.calls.clear()
        call()
        kinds = _kinds(comm)
        assert kinds[0] == "ibarrier" and kinds.count("test") == 4 and kinds[-1] == last, kinds
        assert "Barrier" not in kinds


def test_the_wait_sleeps_between_tests(monkeypatch):
    comm = _MPI3Comm(n_false=6)
    b = backends.MpiObjectsBackend(comm, _FakeMPI)
    slept = []
    monkeypatch.setattr(backends.time, "sleep", slept.append)
    comm.calls.clear()
    b.barrier()
    assert len(slept) == 6 and slept == sorted(slept) and max(slept) <= b.MAX_POLL_S and slept[0] > 0


def test_phase_clock_counts_from_the_process_start():
    t0 = process_start()
    assert 0 <= time.time() - t0 < 24 * 3600
    clock = PhaseClock()
    clock.mark("a")
    x = sum(i * i for i in range(200_000))  # some CPU
    clock.mark("b")
    ph = clock.phases()
    assert [p["name"] for p in ph] == ["a", "b"] and x > 0
    assert ph[0]["end_wall_s"] > 0 and ph[0]["cpu_s"] > 0          # start-up and imports before the first mark
    assert ph[1]["cpu_s"] > 0 and ph[1]["end_wall_s"] >= ph[0]["end_wall_s"]
    assert clock.json().startswith('[{"name":"a"')


def _plan(sizes: dict[str, int]) -> pre.PreprocessPlan:
    return pre.PreprocessPlan(Path("."), "kits19", {0: 0}, ["background"], {c: Path(c) for c in sizes},
                    {c: {"n_voxels": n} for c, n in sizes.items()})


def _me(rank, world):
    return pre.Rank(None, Path("."), rank, world, logging.getLogger("t"), False)


def test_every_case_on_one_rank_and_the_lightest_rank_fits_the_clinical_pipeline():
    sizes = {"a": 100, "b": 90, "c": 50, "d": 30}   # LPT: rank 0 gets a (100), rank 1 b, c (140) then d to 0
    shares, fit = [], set()
    for r in range(2):
        me = _me(r, 2)
        shares.append(pre.partition_cases(me, _plan(sizes)))
        fit.add(me.fit_rank)
    assert sorted(shares[0] + shares[1]) == sorted(sizes) and not set(shares[0]) & set(shares[1])
    assert shares == [["a", "d"], ["b", "c"]] and fit == {0}         # loads 130 and 140: rank 0 is lighter


def test_on_a_tie_the_last_rank_fits_and_alone_it_is_rank_0():
    for r in range(2):
        me = _me(r, 2)
        pre.partition_cases(me, _plan({"a": 10, "b": 10}))
        assert me.fit_rank == 1
    me = _me(0, 1)
    assert pre.partition_cases(me, _plan({"a": 10, "b": 10})) == ["a", "b"] and me.fit_rank == 0


def test_a_plain_process_asking_for_ranks_only_starts_no_horovod(monkeypatch):
    from hpc_dfs.parallel.launch import launch_rank_size

    class _Hvd:  # a Horovod that imports: init() must not be reached
        def __getattr__(self, name):
            raise AssertionError(f"horovod.{name} used by init(horovod=False) in a plain process")

    for var in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID",
                "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "HOROVOD_RANK", "HOROVOD_SIZE",
                "HOROVOD_GLOO_RENDEZVOUS_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert launch_rank_size() == (0, 1) and backends.launcher() == "none"
    monkeypatch.setitem(sys.modules, "horovod.torch", _Hvd())
    assert isinstance(backends.select(horovod=False), backends.SingleBackend)


def test_predict_shares_the_header_reads_and_partitions_as_before(monkeypatch, tmp_path):
    from hpc_dfs.inference import cases as pr

    cases = [pr.CaseInput(f"case_{i:05d}", tmp_path / f"case_{i:05d}" / "imaging.nii.gz") for i in range(5)]
    sizes = {c.case_id: 100 - 7 * i for i, c in enumerate(cases)}
    read = []

    def count(path):
        read.append(path.parent.name)
        return sizes[path.parent.name]
    monkeypatch.setattr(pr, "voxel_count", count)
    assert pr.voxel_counts(cases, 1, 2) == {"case_00001": 93, "case_00003": 79} == {c: sizes[c] for c in read}
    read.clear()
    assert pr.voxel_counts(cases, 0, 1) == sizes and len(read) == 5
    for r in range(2):  # with the shared counts, each rank gets what it got reading every header itself
        assert pr.partition(cases, r, 2, sizes) == pr.partition(cases, r, 2)
    assert sorted(c.case_id for r in range(2) for c in pr.partition(cases, r, 2, sizes)) == sorted(sizes)
