"""The one place that talks to Horovod, MPI and torch.distributed: ranks, collectives, the optimizer wrapper,
the device.

Usage::

    from hpc_dfs import parallel
    parallel.init()                     # or parallel.init(horovod=False) in a stage that needs only ranks and objects
    if parallel.is_main(): log.info("world size %d", parallel.size())
    opt = parallel.DistributedOptimizer(opt, model.named_parameters())
    parallel.broadcast_model(model); parallel.broadcast_optimizer_state(opt)

:func:`init` picks ONE backend object (:mod:`hpc_dfs.parallel.backends`) and every function below delegates to it:

- **Horovod** (``horovod.torch``): :func:`init` under any launcher, and in a plain process at size 1.
  Tensor collectives (a differentiable allreduce), object collectives, the distributed optimizer.
- **torch.distributed** (:mod:`hpc_dfs.parallel.torch_backend`): the torch engine (``--engine torch``,
  ``HPC_DFS_ENGINE=torch``, or launched by torchrun): Gloo on CPU, NCCL on CUDA; the same tensor and object
  collectives and the same distributed optimizer protocol as Horovod, with the same arithmetic. Rendezvous
  from torchrun's, SLURM's or Open MPI's environment (:mod:`hpc_dfs.parallel.rendezvous`).
- **MPI objects** (mpi4py's COMM_WORLD): ``init(horovod=False)`` under ``mpirun`` or ``srun``, for the
  stages that need only ranks and object collectives (synth, preprocess, predict, evaluate). Horovod is
  not started (its background thread slowed CPU-bound work of 2 ranks on 2 cores by 1.5-2x); a tensor
  collective, model broadcast or distributed optimizer is then a :class:`DistError`.
- **Single process**: a plain process that asked for ``init(horovod=False)`` (no Horovod to start), or
  whose Horovod cannot be imported; every collective has its
  size-1 meaning, so single-process tools work without Horovod. A launch of more than one process
  without Horovod is a :class:`DistError` (exit code 4), as is a Horovod built without the launcher's
  controller, or one that sees another number of processes than the launcher started.

The same code runs unchanged under each way of launching a job::

    python -m hpc_dfs VERB ...                                  # one plain process, size 1
    horovodrun -np 2 -H localhost:2 --gloo hpc-dfs VERB ...     # Gloo controller
    horovodrun -np 2 hpc-dfs VERB ...  /  mpirun -np 2 hpc-dfs VERB ...   # MPI controller
    srun --mpi=pmix -n 2 hpc-dfs VERB ...                       # inside a SLURM allocation
    torchrun --nproc_per_node 2 -m hpc_dfs VERB ...             # the torch engine
    mpirun -np 2 hpc-dfs train --engine torch ...  /  srun -n 2 hpc-dfs train --engine torch ...

Logging is :mod:`hpc_dfs.log`; it tags lines with :func:`rank_size_or_env`, which never initialises.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable

import numpy as np

from hpc_dfs.parallel.backends import Backend, DistError, select
from hpc_dfs.parallel.launch import launch_rank_size, launcher, requested_engine
from hpc_dfs.parallel.syncbn import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "DistError", "init", "engine", "requested_engine", "shutdown", "finish_for_exit",
    "horovod_available", "torch_engine_active", "launcher", "rank_size_or_env", "rank",
    "size", "local_rank", "local_size", "is_main", "topology", "device", "configure_threads", "allreduce",
    "allreduce_scalar", "allgather", "broadcast_object", "allgather_object", "barrier", "broadcast_model",
    "broadcast_optimizer_state", "DistributedOptimizer", "abort", "SyncBatchNorm", "convert_sync_batchnorm",
]

_backend: Backend | None = None   # chosen once by init(), dropped by shutdown()


def init(horovod: bool = True, engine: str | None = None, timeout_s: float | None = None) -> None:
    """Choose the backend for the way this process was launched and start it (once; later calls return).

    Args:
        horovod: False when the stage needs only ranks and object collectives (preprocess, predict,
            evaluate, synth): under an MPI launcher these then go through mpi4py, under torchrun through
            the torch engine's Gloo, in a plain process through the size-1 backend, and Horovod is not
            started. Under ``horovodrun --gloo`` Horovod is still used (there is no MPI there).
        engine: ``horovod`` or ``torch`` for the tensor work; None: ``$HPC_DFS_ENGINE``, else torch under
            torchrun, else horovod.
        timeout_s: the torch engine's longest wait for another rank (Horovod's is its stall timeout).

    Raises:
        DistError: (exit code 4) when the job cannot work as launched; the message says how to fix it.
        ConfigError: (exit code 2) an engine other than horovod or torch.
    """
    global _backend
    if _backend is None:
        _backend = select(horovod=horovod, engine=engine, timeout_s=timeout_s)


def engine() -> str:
    """The chosen backend's name: ``horovod``, ``torch``, ``mpi4py`` or ``single`` (initialises if needed)."""
    return _b().name


def shutdown() -> None:
    """Stop Horovod if it was started and forget the backend (the next call initialises again)."""
    global _backend
    if _backend is not None:
        _backend.shutdown()
    _backend = None


def finish_for_exit() -> bool:
    """Finalize MPI if this process started it (mpi4py backend; the torch engine also leaves its process group),
    before a process exits without teardown.

    Returns:
        Whether the process may now exit at once (``os._exit``): False under Horovod, whose shutdown
        belongs to the interpreter's own exit.
    """
    if _backend is None or _backend.name == "single":
        return True
    if _backend.name not in ("mpi4py", "torch"):
        return False
    _backend.finalize()
    return True


def _b() -> Backend:
    if _backend is None:
        init()
    return _backend


def horovod_available() -> bool:
    """Whether the chosen backend is Horovod (False before :func:`init`)."""
    return _backend is not None and _backend.name == "horovod"


def torch_engine_active() -> bool:
    """Whether the chosen backend is the torch engine (False before :func:`init`)."""
    return _backend is not None and _backend.name == "torch"


def rank_size_or_env() -> tuple[int, int]:
    """(rank, size) of this process: from the backend once initialised, else from the launcher's environment.

    Never initialises anything, so a logger can call it before :func:`init`.
    """
    if _backend is not None:
        return _backend.rank, _backend.size
    return launch_rank_size()


# ----------------------------------------------------------------------------- topology
def rank() -> int:
    """This process's rank in the job (0 for a plain process)."""
    return _b().rank


def size() -> int:
    """The number of processes in the job."""
    return _b().size


def local_rank() -> int:
    """This process's rank among the processes on its node."""
    return _b().local_rank


def local_size() -> int:
    """The number of processes on this node."""
    return _b().local_size


def is_main() -> bool:
    """Whether this is rank 0 (the rank that writes shared files and logs at INFO)."""
    return rank() == 0


def topology() -> dict:
    """A plain dict describing the job, for logs and checkpoints.

    Keys: rank, size, local_rank, local_size, launcher, host, engine (the backend), horovod, mpi4py, under
    Horovod mpi, gloo, nccl, and under the torch engine torch_distributed (gloo or nccl) and init.
    """
    b = _b()
    info = {"rank": b.rank, "size": b.size, "local_rank": b.local_rank, "local_size": b.local_size,
            "launcher": launcher(), "host": os.uname().nodename, "engine": b.name}
    info.update(b.describe())
    return info


# ----------------------------------------------------------------------------- device & threads
def device():
    """CUDA device ``local_rank % device_count()`` when CUDA is present (and made current), else CPU."""
    import torch
    if torch.cuda.is_available():
        idx = local_rank() % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def configure_threads(threads: int | None = None) -> int:
    """Give each rank its share of the node's cores: ``cores // local_size`` (at least 1).

    On 2 cores, ``mpirun -np 2`` with 2 threads per rank runs about 10x slower than with 1.

    Args:
        threads: the number to use; None or <= 0 means SLURM_CPUS_PER_TASK, else OMP_NUM_THREADS, else the
            share of the cores this process may run on.

    Returns:
        The number of torch threads set.
    """
    import torch
    if threads is None or threads <= 0:
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            threads = int(os.environ["SLURM_CPUS_PER_TASK"])
        elif os.environ.get("OMP_NUM_THREADS"):
            threads = int(os.environ["OMP_NUM_THREADS"])
        else:
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover
                cores = os.cpu_count() or 1
            threads = max(1, cores // max(1, local_size()))
    torch.set_num_threads(threads)
    return threads


# ----------------------------------------------------------------------------- collectives
def allreduce(tensor, op: str = "mean", name: str | None = None):
    """Allreduce a tensor (differentiable through Horovod). Returns a new tensor.

    Args:
        tensor: the same shape and dtype on every rank.
        op: mean (avg, average), sum, min or max.
        name: the collective's name, the same on every rank (default: numbered in call order).

    Raises:
        ValueError: for an unknown ``op``.
        DistError: under ``init(horovod=False)`` with mpi4py (tensor collectives need Horovod).
    """
    return _b().allreduce(tensor, op, name)


def allreduce_scalar(value: float, op: str = "mean", name: str | None = None) -> float:
    """Allreduce a Python number; returns a float on every rank (float64 on the wire). Works in every backend.

    Raises:
        ValueError: for an unknown ``op``.
    """
    return float(_b().allreduce_array(np.asarray([float(value)], dtype=np.float64), op, name)[0])


def allgather(tensor, name: str | None = None):
    """Concatenate tensors of all ranks along dim 0 (first dims may differ).

    Raises:
        DistError: under ``init(horovod=False)`` with mpi4py (tensor collectives need Horovod).
    """
    return _b().allgather(tensor, name)


def broadcast_object(obj: Any, root: int = 0, name: str | None = None) -> Any:
    """Broadcast a picklable Python object from ``root``; returns it on every rank."""
    return _b().broadcast_object(obj, root, name)


def allgather_object(obj: Any, name: str | None = None) -> list:
    """Gather one picklable object per rank; every rank gets the list in rank order."""
    return _b().allgather_object(obj, name)


def barrier() -> None:
    """Wait until every rank has arrived."""
    _b().barrier()


def broadcast_model(model, root: int = 0) -> None:
    """Make every rank's parameters and buffers equal to ``root``'s.

    Raises:
        DistError: under ``init(horovod=False)`` with mpi4py.
    """
    _b().broadcast_model(model, root)


def broadcast_optimizer_state(optimizer, root: int = 0) -> None:
    """Make every rank's optimizer state (and hyper-parameters) equal to ``root``'s.

    Raises:
        DistError: under ``init(horovod=False)`` with mpi4py.
    """
    _b().broadcast_optimizer_state(optimizer, root)


def DistributedOptimizer(optimizer, named_parameters: Iterable | None = None, compression: str = "none",
                         op: str = "average", backward_passes_per_step: int = 1,
                         gradient_predivide_factor: float = 1.0):
    """``hvd.DistributedOptimizer`` with names for the options; under the torch engine the same protocol
    (``synchronize``, ``skip_synchronize``, ``step``) with torch.distributed
    (:class:`hpc_dfs.parallel.torch_backend.GradientSync`).

    At size 1 without Horovod the optimizer is returned unchanged (and gets no-op
    ``synchronize``/``skip_synchronize``).

    Args:
        optimizer: the torch optimizer to wrap.
        named_parameters: ``model.named_parameters()`` (names the gradient allreduces).
        compression: 'none' or 'fp16' (on the wire).
        op: 'average', 'adasum' or 'sum'.
        backward_passes_per_step: local gradient accumulation steps per allreduce.
        gradient_predivide_factor: as Horovod's.

    Raises:
        ValueError: for an unknown ``compression`` or ``op``.
        DistError: under ``init(horovod=False)`` with mpi4py; ``op='adasum'`` under the torch engine.
    """
    return _b().distributed_optimizer(optimizer, named_parameters, compression, op, backward_passes_per_step,
                                      gradient_predivide_factor)


# ----------------------------------------------------------------------------- errors that must not hang a job
def abort(code: int = 1) -> None:
    """Kill the whole job: MPI_Abort under an MPI launcher, else exit this process (works before init).

    Called when one rank hits an error that the others would otherwise wait on forever. Log handlers and
    stdout/stderr are flushed first. Under the torch engine MPI is used only where it was started (mpirun's
    rendezvous); otherwise the exit closes this rank's sockets, which fails the other ranks' next collective,
    and torchrun (or srun's ``--kill-on-bad-exit``) stops the rest.

    Args:
        code: the exit status.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    torch_engine = _backend is not None and _backend.name == "torch"
    if launcher() in ("mpirun", "srun") and (not torch_engine or "mpi4py.MPI" in sys.modules):
        try:
            from mpi4py import MPI  # mpi4py is imported only in hpc_dfs/parallel
            MPI.COMM_WORLD.Abort(code)
        except Exception:  # pragma: no cover - fall through to a hard exit
            pass
    os._exit(code)
