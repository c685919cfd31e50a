"""The backends behind :mod:`hpc_dfs.parallel`, and the choice among them (:func:`select`).

============  ===========================================  ==============================================
backend       chosen when                                  what it can do
============  ===========================================  ==============================================
Horovod       ``init()`` with the horovod engine (in a     everything: tensor collectives (differentiable
              plain process: where Horovod imports);       allreduce), object collectives, the distributed
              ``init(horovod=False)`` only under           optimizer, model and optimizer broadcast
              ``horovodrun --gloo``
Torch         ``init()`` with the torch engine (torchrun,  everything, as Horovod (Gloo on CPU, NCCL on
              mpirun, srun, a plain process);              CUDA): :mod:`hpc_dfs.parallel.torch_backend`;
              ``init(horovod=False)`` under torchrun, or   object-only stages get Gloo alone
              srun with ``HPC_DFS_ENGINE=torch``
MpiObjects    ``init(horovod=False)`` under ``mpirun`` or  ranks, object collectives, number allreduce,
              ``srun`` (mpi4py's COMM_WORLD)               barrier; tensor work is a :class:`DistError`
Single        a plain process: ``init(horovod=False)``,    size-1 semantics of everything (a collective
              or ``init()`` where Horovod cannot be        returns its input, a broadcast is a no-op)
              imported
============  ===========================================  ==============================================

The engine (horovod or torch) is ``--engine``, else ``$HPC_DFS_ENGINE``, else torch under torchrun and
horovod elsewhere. Horovod, mpi4py and torch.distributed are imported in this package and nowhere else in
hpc_dfs, only when a backend is chosen.
"""
from __future__ import annotations

import abc
import contextlib
import time
from typing import Any, Iterable

import numpy as np
import torch

from hpc_dfs.parallel.launch import launch_rank_size, launcher, requested_engine
from hpc_dfs.errors import EXIT_ENV, HpcDfsError

__all__ = ["DistError", "Backend", "HorovodBackend", "MpiObjectsBackend", "SingleBackend", "reduction", "select"]


class DistError(HpcDfsError, RuntimeError):
    """Horovod/MPI is missing or misconfigured for the way this job was launched."""

    code = EXIT_ENV


# The one table of reductions: accepted name -> (Horovod op, mpi4py op). "mean" is a sum divided by the size
# under MPI. Aliases are spelled out so that a log or config may say avg or average.
_REDUCTIONS = {"mean": ("Average", "SUM"), "sum": ("Sum", "SUM"), "min": ("Min", "MIN"), "max": ("Max", "MAX")}
_ALIASES = {"avg": "mean", "average": "mean"}


def reduction(op: str) -> str:
    """The canonical name (mean, sum, min, max) of a reduction.

    Args:
        op: mean, avg, average, sum, min or max (any case).

    Raises:
        ValueError: for any other name.
    """
    name = _ALIASES.get(op.lower(), op.lower())
    if name not in _REDUCTIONS:
        raise ValueError(f"unknown reduction '{op}' (use mean, sum, min or max)")
    return name


class Backend(abc.ABC):
    """What every backend answers; the public functions of :mod:`hpc_dfs.parallel` delegate to it.

    The job's shape is fixed once the backend is started, so it is held as plain attributes.

    Args:
        rank: this process's rank in the job.
        size: the number of processes.
        local_rank: this process's rank among those on its node (picks the CUDA device).
        local_size: the number of processes on this node (shares the cores).
    """

    name = "abstract"

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int) -> None:
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size

    def describe(self) -> dict:
        """The backend's part of :func:`hpc_dfs.parallel.topology`."""
        return {"horovod": False, "mpi4py": False}

    @abc.abstractmethod
    def allreduce(self, tensor: torch.Tensor, op: str, name: str | None) -> torch.Tensor:
        """A new tensor: ``op`` over the ranks' tensors (differentiable under Horovod)."""

    @abc.abstractmethod
    def allgather(self, tensor: torch.Tensor, name: str | None) -> torch.Tensor:
        """The ranks' tensors concatenated along dim 0."""

    @abc.abstractmethod
    def allreduce_array(self, arr: np.ndarray, op: str, name: str | None) -> np.ndarray:
        """``op`` over the ranks' float64 arrays; the one collective that every backend can do on numbers."""

    @abc.abstractmethod
    def broadcast_object(self, obj: Any, root: int, name: str | None) -> Any:
        """``root``'s picklable object, on every rank."""

    @abc.abstractmethod
    def allgather_object(self, obj: Any, name: str | None) -> list:
        """Every rank's object, in rank order."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Return when every rank has called it."""

    @abc.abstractmethod
    def broadcast_model(self, model: torch.nn.Module, root: int) -> None:
        """Copy ``root``'s parameters and buffers into every rank's ``model``."""

    @abc.abstractmethod
    def distributed_optimizer(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable | None,
                              compression: str, op: str, backward_passes_per_step: int,
                              gradient_predivide_factor: float) -> torch.optim.Optimizer:
        """An optimizer whose ``step`` uses the gradients reduced over the ranks (see the public function)."""

    @abc.abstractmethod
    def broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer, root: int) -> None:
        """Copy ``root``'s optimizer state into every rank's ``optimizer``."""

    def shutdown(self) -> None:
        """Release what the backend started (nothing, unless it started Horovod)."""


class SingleBackend(Backend):
    """One process, no Horovod: every collective has its size-1 meaning."""

    name = "single"

    def __init__(self) -> None:
        super().__init__(rank=0, size=1, local_rank=0, local_size=1)

    def allreduce(self, tensor: torch.Tensor, op: str, name: str | None) -> torch.Tensor:
        reduction(op)
        return tensor.clone()

    def allreduce_array(self, arr: np.ndarray, op: str, name: str | None) -> np.ndarray:
        reduction(op)
        return arr.copy()

    def allgather(self, tensor: torch.Tensor, name: str | None) -> torch.Tensor:
        return tensor.clone()

    def broadcast_object(self, obj: Any, root: int, name: str | None) -> Any:
        return obj

    def allgather_object(self, obj: Any, name: str | None) -> list:
        return [obj]

    def barrier(self) -> None:
        return None

    def broadcast_model(self, model: torch.nn.Module, root: int) -> None:
        return None

    def broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer, root: int) -> None:
        return None

    def distributed_optimizer(self, optimizer, named_parameters, compression, op, backward_passes_per_step,
                              gradient_predivide_factor):
        """The optimizer itself, with the no-op ``synchronize``/``skip_synchronize`` the trainer calls."""
        optimizer.synchronize = lambda: None
        optimizer.skip_synchronize = contextlib.nullcontext
        return optimizer


class MpiObjectsBackend(Backend):
    """mpi4py's COMM_WORLD for stages that need only ranks and object collectives (``init(horovod=False)``).

    Horovod is not started: its background thread polls MPI every cycle, which slowed CPU-bound work of
    2 ranks on 2 cores by 1.5-2x.

    Args:
        comm: an mpi4py communicator (``MPI.COMM_WORLD``).
        mpi: the ``mpi4py.MPI`` module (for the reduction ops and the node split).
    """

    name = "mpi4py"

    #: the longest sleep between two tests of a pending barrier (seconds): the latency a wait may add
    MAX_POLL_S = 0.005

    def __init__(self, comm: Any, mpi: Any) -> None:
        self._comm, self._mpi = comm, mpi
        self._quiet_wait(comm.Get_size())  # the ranks finish their imports at different times
        node = comm.Split_type(mpi.COMM_TYPE_SHARED)   # a collective: every rank constructs this at init()
        super().__init__(comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size())

    def _quiet_wait(self, size: int | None = None) -> bool:
        """Return when every rank has arrived, sleeping (not spinning) while the slower ones work.

        MPI's blocking collectives busy-poll: a rank that waits in one burns a whole core, which on a node
        with as many ranks as cores (or a shared one) is taken from the ranks still working. So each
        object collective and barrier first waits here on a non-blocking barrier, tested with a sleep
        that grows from 0.1 ms to :attr:`MAX_POLL_S`; the collective itself then finds every rank there.

        Returns:
            Whether it waited: False at size 1, or for a communicator without ``Ibarrier`` (before MPI-3),
            where the blocking collective that follows does the waiting.
        """
        if (self.size if size is None else size) <= 1 or not hasattr(self._comm, "Ibarrier"):
            return False
        req = self._comm.Ibarrier()
        delay = 1e-4
        while not req.Test():
            time.sleep(delay)
            delay = min(2 * delay, self.MAX_POLL_S)
        return True

    def describe(self) -> dict:
        return {"horovod": False, "mpi4py": True}

    def finalize(self) -> None:
        """``MPI_Finalize`` (once): needed before ``os._exit``, which skips mpi4py's own finalization."""
        if not self._mpi.Is_finalized():
            self._mpi.Finalize()

    def allreduce_array(self, arr: np.ndarray, op: str, name: str | None) -> np.ndarray:
        kind = reduction(op)
        out = np.empty_like(arr)
        self._quiet_wait()
        self._comm.Allreduce(arr, out, op=getattr(self._mpi, _REDUCTIONS[kind][1]))
        return out / self.size if kind == "mean" else out

    def broadcast_object(self, obj: Any, root: int, name: str | None) -> Any:
        self._quiet_wait()
        return self._comm.bcast(obj, root=root)

    def allgather_object(self, obj: Any, name: str | None) -> list:
        self._quiet_wait()
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        if not self._quiet_wait():
            self._comm.Barrier()

    @staticmethod
    def _needs_horovod(what: str) -> DistError:
        return DistError(f"{what} needs Horovod: call parallel.init() (not init(horovod=False)) in this stage")

    def allreduce(self, tensor, op, name):
        raise self._needs_horovod("tensor collectives")

    def allgather(self, tensor, name):
        raise self._needs_horovod("tensor collectives")

    def broadcast_model(self, model, root):
        raise self._needs_horovod("broadcast_model")

    def broadcast_optimizer_state(self, optimizer, root):
        raise self._needs_horovod("broadcast_optimizer_state")

    def distributed_optimizer(self, optimizer, named_parameters, compression, op, backward_passes_per_step,
                              gradient_predivide_factor):
        raise self._needs_horovod("DistributedOptimizer")


class HorovodBackend(Backend):
    """``horovod.torch`` once ``hvd.init()`` has run (under any launcher, or alone at size 1).

    A collective without a name gets ``<kind>.<n>`` from one counter; every rank runs the same
    collectives in the same order, so the names agree across ranks.

    Args:
        hvd: the initialised ``horovod.torch`` module.
    """

    name = "horovod"

    def __init__(self, hvd: Any) -> None:
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
        self._hvd, self._counter = hvd, 0

    def _name(self, prefix: str, name: str | None) -> str:
        if name:
            return name
        self._counter += 1
        return f"{prefix}.{self._counter}"

    def describe(self) -> dict:
        hvd = self._hvd
        return {"horovod": True, "mpi4py": False, "mpi": bool(hvd.mpi_enabled()), "gloo": bool(hvd.gloo_enabled()),
                "nccl": bool(hvd.nccl_built())}

    def allreduce(self, tensor: torch.Tensor, op: str, name: str | None) -> torch.Tensor:
        hvd_op = getattr(self._hvd, _REDUCTIONS[reduction(op)][0])
        return self._hvd.allreduce(tensor, op=hvd_op, name=self._name("allreduce", name))

    def allreduce_array(self, arr: np.ndarray, op: str, name: str | None) -> np.ndarray:
        return self.allreduce(torch.as_tensor(arr), op, name).numpy()

    def allgather(self, tensor: torch.Tensor, name: str | None) -> torch.Tensor:
        return self._hvd.allgather(tensor, name=self._name("allgather", name))

    def broadcast_object(self, obj: Any, root: int, name: str | None) -> Any:
        return self._hvd.broadcast_object(obj, root_rank=root, name=self._name("bcast_obj", name))

    def allgather_object(self, obj: Any, name: str | None) -> list:
        return self._hvd.allgather_object(obj, name=self._name("gather_obj", name))

    def barrier(self) -> None:
        if self.size > 1:
            self._hvd.barrier()

    def broadcast_model(self, model: torch.nn.Module, root: int) -> None:
        self._hvd.broadcast_parameters(model.state_dict(), root_rank=root)

    def broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer, root: int) -> None:
        self._hvd.broadcast_optimizer_state(optimizer, root_rank=root)

    def distributed_optimizer(self, optimizer, named_parameters, compression, op, backward_passes_per_step,
                              gradient_predivide_factor):
        """``hvd.DistributedOptimizer``; compression none|fp16, op average|adasum|sum (ValueError otherwise)."""
        hvd = self._hvd
        comp = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}
        if compression not in comp:
            raise ValueError(f"unknown gradient compression '{compression}' (use none or fp16)")
        ops = {"average": hvd.Average, "adasum": hvd.Adasum, "sum": hvd.Sum}
        if op.lower() not in ops:
            raise ValueError(f"unknown gradient reduction '{op}' (use average or adasum)")
        return hvd.DistributedOptimizer(
            optimizer, named_parameters=list(named_parameters) if named_parameters is not None else None,
            compression=comp[compression], op=ops[op.lower()], backward_passes_per_step=backward_passes_per_step,
            gradient_predivide_factor=gradient_predivide_factor)

    def shutdown(self) -> None:
        self._hvd.shutdown()


# ----------------------------------------------------------------------------- the choice, at init()
def select(horovod: bool = True, engine: str | None = None, timeout_s: float | None = None) -> Backend:
    """Choose and start the backend for the way this process was launched and the engine asked for.

    Args:
        horovod: False when the stage needs only ranks and object collectives; under ``mpirun``/``srun``
            that selects :class:`MpiObjectsBackend` (the torch engine's Gloo under ``srun`` with
            ``HPC_DFS_ENGINE=torch``: no MPI needed), under torchrun the torch engine's Gloo, in a plain
            process :class:`SingleBackend` (under ``horovodrun --gloo`` there is no MPI, so Horovod).
        engine: ``horovod`` or ``torch``; None: ``$HPC_DFS_ENGINE``, else torch under torchrun, else horovod
            (:func:`hpc_dfs.parallel.launch.requested_engine`).
        timeout_s: the torch engine's longest wait for another rank (default :data:`TORCH_TIMEOUT_S`).

    Raises:
        DistError: (exit code 4) when the launcher started more than one process and the library the
            backend needs is missing, built without this launcher's controller, or sees another size; or
            when the launcher cannot start the engine asked for (Horovod under torchrun, torch under
            ``horovodrun``).
        ConfigError: (exit code 2) for an engine name other than horovod or torch.
    """
    lch = launcher()
    eng = _engine(engine)
    if not horovod and (lch == "torchrun" or (lch == "srun" and eng == "torch")):
        return _torch(tensors=False, timeout_s=timeout_s)
    if not horovod and lch in ("mpirun", "srun"):
        return _mpi_objects(lch)
    if not horovod and lch == "none":  # one plain process: nothing to start (Horovod's init and its thread cost)
        return SingleBackend()
    if eng == "torch" and lch != "horovodrun-gloo":
        return _torch(tensors=horovod, timeout_s=timeout_s)
    if eng == "torch":
        raise DistError("horovodrun starts Horovod, not the torch engine: use --engine horovod, or launch with "
                        "torchrun, mpirun or srun")
    if lch == "torchrun":
        raise DistError("torchrun starts no Horovod: use --engine torch (the default under torchrun) or launch "
                        "Horovod with horovodrun, mpirun or srun")
    return _horovod(lch)


#: the torch engine's longest wait in a collective or the rendezvous when the stage names none (seconds)
TORCH_TIMEOUT_S = 1800.0


def _engine(engine: str | None) -> str:
    from hpc_dfs.config import ConfigError
    try:
        return requested_engine(engine)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _torch(tensors: bool, timeout_s: float | None) -> Backend:
    from hpc_dfs.parallel import rendezvous, torch_backend   # torch.distributed only when this engine is chosen
    try:
        rdv = rendezvous.rendezvous()
    except ImportError as e:
        raise DistError(f"launched by {launcher()} but mpi4py cannot be imported ({e}); run `make setup`, or "
                        f"launch the torch engine with torchrun or srun") from None
    except KeyError as e:
        raise DistError(f"the torch engine cannot find its rendezvous: {e.args[0]} is missing") from None
    return torch_backend.start(rdv, tensors, TORCH_TIMEOUT_S if timeout_s is None else timeout_s)


def _horovod(lch: str) -> Backend:
    n = launch_rank_size()[1]
    try:
        import horovod.torch as hvd  # the only import of horovod in hpc_dfs (besides syncbn's SyncBatchNorm)
    except ImportError as e:
        if n > 1:
            raise DistError(
                f"this job was launched with {n} processes ({lch}) but Horovod cannot be imported "
                f"({e}). Run `make setup` (it builds Horovod with PyTorch, MPI and Gloo), activate the "
                f"environment that has it, or use the torch engine (--engine torch).") from None
        return SingleBackend()
    _check_horovod_build(hvd, lch)
    hvd.init()
    if n > 1 and hvd.size() != n:
        raise DistError(f"launcher says {n} processes but Horovod sees {hvd.size()}: the MPI library Horovod was "
                        f"built against differs from the launcher's (check `horovodrun --check-build`, "
                        f"`which mpirun`, and use srun --mpi=pmix or pmi2 as the cluster supports)")
    return HorovodBackend(hvd)


def _mpi_objects(lch: str) -> MpiObjectsBackend:
    try:
        from mpi4py import MPI  # mpi4py is imported only in hpc_dfs/parallel
    except ImportError as e:
        raise DistError(f"launched by {lch} but mpi4py cannot be imported ({e}); run `make setup`") from None
    return MpiObjectsBackend(MPI.COMM_WORLD, MPI)


def _check_horovod_build(hvd: Any, lch: str) -> None:
    """Stop with a clear message when this Horovod lacks the controller the launcher needs."""
    if lch in ("mpirun", "srun") and not hvd.mpi_built():
        raise DistError("launched by MPI but this Horovod was built without MPI: rebuild with HOROVOD_WITH_MPI=1 "
                        "(make setup does), or launch with `horovodrun --gloo`")
    if lch == "horovodrun-gloo" and not hvd.gloo_built():
        raise DistError("launched by `horovodrun --gloo` but this Horovod was built without Gloo: rebuild with "
                        "HOROVOD_WITH_GLOO=1 (make setup does), or launch with mpirun")
    if lch == "none" and hvd.gloo_built() and not hvd.mpi_built():
        raise DistError("this Horovod has only Gloo, which needs `horovodrun --gloo` even for one process")
