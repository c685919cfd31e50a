"""hpc_dfs.parallel in one process: the backend choice, the size-1 semantics, the rank from the environment.

The 2-rank semantics are tested under real launchers in tests/distributed/spmd.
"""
import sys

import numpy as np
import pytest
import torch

from hpc_dfs import parallel
from hpc_dfs.parallel import backends
from hpc_dfs.parallel.launch import launch_rank_size
from hpc_dfs.errors import EXIT_ENV, HpcDfsError

LAUNCH_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "HOROVOD_RANK", "HOROVOD_SIZE", "PMIX_RANK",
               "PMI_SIZE", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "HOROVOD_GLOO_RENDEZVOUS_ADDR")


@pytest.fixture
def plain_env(monkeypatch):
    """A process that no launcher started (whatever launched pytest)."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def no_backend(plain_env):
    """parallel before init(): the module's backend is put back after the test."""
    plain_env.setattr(parallel, "_backend", None)
    return plain_env


# ----------------------------------------------------------------------------- single-process backend
def test_single_backend_has_size_one_semantics():
    b = backends.SingleBackend()
    assert (b.rank, b.size, b.local_rank, b.local_size) == (0, 1, 0, 1)
    t = torch.tensor([1.0, 2.0])
    out = b.allreduce(t, "mean", None)
    assert torch.equal(out, t) and out is not t                 # a new tensor, as Horovod's
    assert torch.equal(b.allgather(t, None), t)
    np.testing.assert_array_equal(b.allreduce_array(np.array([3.0]), "max", None), [3.0])
    assert b.broadcast_object({"a": 1}, 0, None) == {"a": 1}
    assert b.allgather_object("x", None) == ["x"]
    assert b.describe() == {"horovod": False, "mpi4py": False}
    b.barrier()


def test_single_backend_optimizer_gets_noop_synchronize():
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.5)
    wrapped = backends.SingleBackend().distributed_optimizer(opt, None, "none", "average", 1, 1.0)
    assert wrapped is opt
    wrapped.synchronize()
    with wrapped.skip_synchronize():
        p.grad = torch.ones(2)
        wrapped.step()
    assert torch.equal(p.detach(), torch.full((2,), -0.5))


@pytest.mark.parametrize("op, canonical", [("mean", "mean"), ("AVG", "mean"), ("average", "mean"), ("sum", "sum"),
                                           ("min", "min"), ("Max", "max")])
def test_reduction_names(op, canonical):
    assert backends.reduction(op) == canonical


def test_unknown_reduction_is_an_error_in_every_backend():
    with pytest.raises(ValueError, match="unknown reduction 'median'"):
        backends.SingleBackend().allreduce(torch.ones(1), "median", None)
    with pytest.raises(ValueError, match="unknown reduction"):
        backends.MpiObjectsBackend(_FakeComm(2), _FakeMPI).allreduce_array(np.ones(1), "median", None)


# ----------------------------------------------------------------------------- mpi4py backend, with a fake comm
class _FakeMPI:
    SUM, MIN, MAX, COMM_TYPE_SHARED = "sum", "min", "max", "shared"


class _FakeComm:
    """COMM_WORLD of ``n`` ranks that all hold the same values (so SUM = n * value)."""

    def __init__(self, n):
        self.n, self.calls = n, []

    def Get_rank(self):
        return 1

    def Get_size(self):
        return self.n

    def Split_type(self, kind):
        self.calls.append(("split", kind))
        return self

    def Allreduce(self, arr, out, op):
        self.calls.append(("allreduce", op))
        out[:] = arr * self.n if op == "sum" else arr

    def bcast(self, obj, root):
        return ("bcast", obj, root)

    def allgather(self, obj):
        return [obj] * self.n

    def Barrier(self):
        self.calls.append(("barrier",))


def test_mpi_objects_backend_mean_is_sum_over_size():
    comm = _FakeComm(4)
    b = backends.MpiObjectsBackend(comm, _FakeMPI)
    assert comm.calls == [("split", "shared")]                 # the node split, once, at construction
    np.testing.assert_array_equal(b.allreduce_array(np.array([1.0, 3.0]), "mean", None), [1.0, 3.0])
    np.testing.assert_array_equal(b.allreduce_array(np.array([1.0, 3.0]), "sum", None), [4.0, 12.0])
    b.allreduce_array(np.array([1.0]), "min", None)
    assert [c[1] for c in comm.calls[1:]] == ["sum", "sum", "min"]
    assert (b.rank, b.size, b.local_size) == (1, 4, 4)
    assert b.describe() == {"horovod": False, "mpi4py": True}
    assert b.allgather_object("o", None) == ["o"] * 4
    assert b.broadcast_object("o", 0, None) == ("bcast", "o", 0)


def test_mpi_objects_backend_refuses_tensor_work():
    b = backends.MpiObjectsBackend(_FakeComm(2), _FakeMPI)
    model = torch.nn.Linear(2, 2)
    for call in (lambda: b.allreduce(torch.ones(1), "sum", None), lambda: b.allgather(torch.ones(1), None),
                 lambda: b.broadcast_model(model, 0),
                 lambda: b.broadcast_optimizer_state(torch.optim.SGD(model.parameters(), lr=0.1), 0),
                 lambda: b.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), None, "none",
                                                 "average", 1, 1.0)):
        with pytest.raises(parallel.DistError, match="needs Horovod") as err:
            call()
        assert err.value.code == EXIT_ENV


# ----------------------------------------------------------------------------- the choice at init()
def test_dist_error_is_an_environment_error():
    assert issubclass(parallel.DistError, HpcDfsError) and parallel.DistError("x").code == EXIT_ENV


def test_plain_process_without_horovod_falls_back_to_size_one(plain_env):
    plain_env.setitem(sys.modules, "horovod.torch", None)     # import horovod.torch -> ImportError
    assert isinstance(backends.select(), backends.SingleBackend)


def test_many_processes_without_horovod_is_a_clear_error(plain_env):
    plain_env.setitem(sys.modules, "horovod.torch", None)
    plain_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(parallel.DistError,
                       match=r"launched with 2 processes \(mpirun\) but Horovod cannot be imported"):
        backends.select()


def test_objects_only_under_mpirun_without_mpi4py_is_a_clear_error(plain_env):
    plain_env.setitem(sys.modules, "mpi4py", None)
    plain_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(parallel.DistError, match="launched by mpirun but mpi4py cannot be imported"):
        backends.select(horovod=False)


def test_init_chooses_once_and_functions_delegate(no_backend):
    parallel.init()
    chosen = parallel._backend
    assert chosen is not None
    parallel.init(horovod=False)                                   # idempotent: no second choice
    assert parallel._backend is chosen
    assert (parallel.rank(), parallel.size(), parallel.is_main(), parallel.local_size()) == (0, 1, True, 1)
    assert parallel.allreduce_scalar(2.5, "sum") == 2.5
    assert parallel.topology()["launcher"] == "none"
    assert parallel.horovod_available() == (chosen.name == "horovod")


def test_functions_initialise_on_first_use(no_backend):
    assert parallel.size() == 1 and parallel._backend is not None


# ----------------------------------------------------------------------------- rank from the environment
def test_env_helper_plain_process(no_backend):
    assert launch_rank_size() == (0, 1)
    assert parallel.rank_size_or_env() == (0, 1)


@pytest.mark.parametrize("env, expect", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}, (3, 4)),            # mpirun
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"}, (1, 2)),                            # horovodrun --gloo
    ({"PMIX_RANK": "5", "PMI_SIZE": "8"}, (5, 8)),                                   # srun --mpi=pmix/pmi2
    ({"SLURM_PROCID": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "6"}, (2, 6)),  # srun, no MPI plugin
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "6"}, (0, 1)),                    # not in a step: no size
    ({"OMPI_COMM_WORLD_RANK": "1", "HOROVOD_RANK": "7", "OMPI_COMM_WORLD_SIZE": "2", "HOROVOD_SIZE": "9"}, (1, 2)),
    ({"OMPI_COMM_WORLD_SIZE": "x", "HOROVOD_SIZE": "3", "HOROVOD_RANK": "2"}, (2, 3)),  # unparsable: next one
])
def test_env_helper_reads_each_launcher(no_backend, env, expect):
    for var, value in env.items():
        no_backend.setenv(var, value)
    assert launch_rank_size() == expect
    assert parallel.rank_size_or_env() == expect                   # no backend yet: the environment's answer
    assert parallel._backend is None                               # and asking did not initialise anything


def test_env_helper_prefers_the_backend_once_initialised(no_backend):
    no_backend.setenv("OMPI_COMM_WORLD_RANK", "3")
    no_backend.setenv("OMPI_COMM_WORLD_SIZE", "4")
    no_backend.setattr(parallel, "_backend", backends.SingleBackend())
    assert parallel.rank_size_or_env() == (0, 1)


@pytest.mark.parametrize("env, expect", [
    ({}, "none"), ({"HOROVOD_GLOO_RENDEZVOUS_ADDR": "h", "HOROVOD_SIZE": "2"}, "horovodrun-gloo"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpirun"), ({"PMIX_RANK": "0", "SLURM_STEP_ID": "1"}, "srun"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "SLURM_STEP_ID": "1"}, "mpirun"),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "srun"), ({"SLURM_STEP_ID": "0"}, "none"),
])
def test_launcher_detection(plain_env, env, expect):
    for var, value in env.items():
        plain_env.setenv(var, value)
    assert parallel.launcher() == expect
