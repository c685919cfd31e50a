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
               "PMI_SIZE", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "HOROVOD_GLOO_RENDEZVOUS_ADDR",
               "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "HPC_DFS_ENGINE",
               "MASTER_ADDR", "MASTER_PORT")


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
    ({"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "RANK": "1"}, "torchrun"),
    ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "torchrun"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "none"),   # RANK alone is any program's variable, not a launcher's
])
def test_launcher_detection(plain_env, env, expect):
    for var, value in env.items():
        plain_env.setenv(var, value)
    assert parallel.launcher() == expect


# ----------------------------------------------------------------------------- the engine and its rendezvous
def test_torchrun_rank_and_size_from_its_environment(no_backend):
    for var, value in {"TORCHELASTIC_RUN_ID": "r", "RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0"}.items():
        no_backend.setenv(var, value)
    assert launch_rank_size() == (3, 4)


@pytest.mark.parametrize("setting, env, torchrun, expect", [
    (None, None, False, "horovod"), (None, None, True, "torch"), (None, "torch", False, "torch"),
    (None, " Torch ", False, "torch"), ("horovod", "torch", True, "horovod"), ("torch", None, False, "torch"),
])
def test_requested_engine(plain_env, setting, env, torchrun, expect):
    if env is not None:
        plain_env.setenv("HPC_DFS_ENGINE", env)
    if torchrun:
        plain_env.setenv("TORCHELASTIC_RUN_ID", "r")
        plain_env.setenv("WORLD_SIZE", "2")
    assert parallel.requested_engine(setting) == expect


def test_unknown_engine_is_a_config_error_naming_its_source(plain_env):
    plain_env.setenv("HPC_DFS_ENGINE", "nccl")
    with pytest.raises(HpcDfsError, match=r"\$HPC_DFS_ENGINE='nccl': the engine is one of horovod, torch") as e:
        backends.select()
    assert e.value.code == 2
    with pytest.raises(ValueError, match="--engine='mpi'"):
        parallel.requested_engine("mpi")


def test_horovod_under_torchrun_and_torch_under_horovodrun_are_clear_errors(plain_env):
    plain_env.setenv("TORCHELASTIC_RUN_ID", "r")
    plain_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(parallel.DistError, match="torchrun starts no Horovod: use --engine torch"):
        backends.select(engine="horovod")
    plain_env.delenv("TORCHELASTIC_RUN_ID")
    plain_env.setenv("HOROVOD_GLOO_RENDEZVOUS_ADDR", "h")
    with pytest.raises(parallel.DistError, match="horovodrun starts Horovod, not the torch engine"):
        backends.select(engine="torch")


def test_torch_engine_in_a_plain_process_is_a_real_size_one_group(no_backend):
    """A real Gloo process group of one rank (no launcher): every collective has its size-1 meaning."""
    import torch.distributed as dist
    parallel.init(engine="torch")
    try:
        assert parallel.engine() == "torch" and dist.is_initialized() and dist.get_world_size() == 1
        assert (parallel.rank(), parallel.size(), parallel.topology()["engine"]) == (0, 1, "torch")
        x = torch.arange(3.0, requires_grad=True)
        y = parallel.allreduce(x * 2, op="sum")
        y.sum().backward()
        assert torch.equal(y, torch.arange(3.0) * 2) and torch.equal(x.grad, torch.full((3,), 2.0))
        assert parallel.allreduce_scalar(2.5, "mean") == 2.5 and parallel.allgather_object("a") == ["a"]
        assert torch.equal(parallel.allgather(torch.ones(2, 3)), torch.ones(2, 3))
        with pytest.raises(parallel.DistError, match="Adasum exists only in Horovod"):
            parallel.DistributedOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), op="adasum")
    finally:
        parallel.shutdown()
    assert not dist.is_initialized()


@pytest.mark.parametrize("nodelist, first", [("node[01-04,07],gpu2", "node01"), ("gpu7", "gpu7"),
                                             ("a1,b2", "a1"), ("n[3,5]", "n3")])
def test_first_host_of_a_slurm_nodelist(nodelist, first, monkeypatch):
    from hpc_dfs.parallel import rendezvous
    monkeypatch.setenv("PATH", "/nonexistent")          # no scontrol: the list is parsed
    assert rendezvous.first_host(nodelist) == first


@pytest.mark.parametrize("spec, node, n", [("2(x3),1", 0, 2), ("2(x3),1", 3, 1), ("4", 0, 4), ("1,3", 1, 3)])
def test_tasks_on_node(spec, node, n):
    from hpc_dfs.parallel import rendezvous
    assert rendezvous.tasks_on_node(spec, node) == n


def test_slurm_rendezvous_from_its_variables(plain_env):
    from hpc_dfs.parallel import rendezvous
    env = {"SLURM_PROCID": "3", "SLURM_STEP_ID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "cn[07-08]",
           "SLURM_JOB_ID": "4242"}
    for var, value in env.items():
        plain_env.setenv(var, value)
    plain_env.setenv("PATH", "/nonexistent")
    rdv = rendezvous.rendezvous()
    assert (rdv.rank, rdv.size, rdv.local_rank, rdv.local_size, rdv.addr) == (3, 4, 1, 2, "cn07")
    assert rdv.port == rendezvous.slurm_port(4242, 1) and rdv.init_method == f"tcp://cn07:{rdv.port}"
    assert rendezvous.slurm_port(4242, 2) != rdv.port          # the job's next step meets elsewhere
    plain_env.setenv("MASTER_PORT", "31234")                    # the environment wins
    assert rendezvous.rendezvous().port == 31234


def test_torch_engine_refuses_horovod_only_features():
    from hpc_dfs.config import ConfigError
    from hpc_dfs.config.train import TrainConfig
    cfg = TrainConfig()
    cfg.horovod.adasum, cfg.horovod.timeline = True, "t.json"
    with pytest.raises(ConfigError, match="--adasum and --timeline exist only in Horovod, but this run uses the "
                                          "torch engine"):
        cfg.check_engine("torch")
    cfg.check_engine("horovod")
