"""The one place that talks to Horovod and MPI.

Every other module asks this one for ranks, collectives, the optimizer wrapper, the device and a
rank-tagged logger. It works unchanged under each way a job is launched::

    python -m hpc_dfs ...                                   # one plain process, size 1
    horovodrun -np 2 --gloo hpc-dfs ...                     # Gloo controller
    horovodrun -np 2 hpc-dfs ...  /  mpirun -np 2 hpc-dfs ...  # MPI controller
    srun --mpi=pmix -n 2 hpc-dfs ...                        # inside a SLURM allocation

Usage::

    from hpc_dfs import dist
    dist.init()
    log = get_logger(__name__)
    if dist.is_main(): log.info("world size %d", dist.size())
    opt = dist.DistributedOptimizer(opt, model.named_parameters())
    dist.broadcast_model(model); dist.broadcast_optimizer_state(opt)

A launch of one process needs no launcher: :func:`init` then runs Horovod at size 1 (or, when
Horovod is missing, a built-in size-1 fallback so that single-process tools still work; any
launcher environment with more than one process and no Horovod is a clear error).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable

from hpc_dfs.errors import EXIT_ENV, HpcDfsError

_hvd = None            # horovod.torch module once initialised, None for the size-1 fallback
_comm = None           # mpi4py COMM_WORLD in objects-only mode (non-training stages under an MPI launcher)
_initialised = False
_LAUNCH_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "HOROVOD_SIZE", "SLURM_NTASKS",
                     "MPI_LOCALNRANKS")


class DistError(HpcDfsError, RuntimeError):
    """Horovod/MPI is missing or misconfigured for the way this job was launched."""

    code = EXIT_ENV


# ----------------------------------------------------------------------------- launch detection
def launcher() -> str:
    """How this process was started: 'horovodrun-gloo', 'mpirun', 'srun', 'horovodrun' or 'none'."""
    if "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ:
        return "horovodrun-gloo"
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ or "PMIX_RANK" in os.environ:
        return "srun" if "SLURM_STEP_ID" in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ else "mpirun"
    if "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "srun"
    return "none"


def _expected_size() -> int:
    for var in ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_STEP_ID" in os.environ:
        try:
            return int(os.environ["SLURM_STEP_NUM_TASKS"])
        except ValueError:
            pass
    return 1


def init(require_horovod: bool | None = None, horovod: bool = True) -> None:
    """Initialise once (idempotent). Fails with one clear message when it cannot work.

    ``require_horovod``: None (default) = required when the launcher started more than one process.
    ``horovod=False``: the stage needs only ranks and object collectives (preprocess, predict,
    evaluate). Under an MPI launcher these then go through mpi4py and Horovod is not started: its
    background thread polls MPI every cycle, which slowed CPU-bound work of 2 ranks on 2 cores by
    1.5-2x. Under ``horovodrun --gloo`` Horovod is still used (there is no MPI there).
    """
    global _hvd, _comm, _initialised
    if _initialised:
        return
    if not horovod and launcher() in ("mpirun", "srun"):
        try:
            from mpi4py import MPI  # noqa: WPS433 (mpi4py is used only here)
        except ImportError as e:
            raise DistError(f"launched by {launcher()} but mpi4py cannot be imported ({e}); run `make setup`") from None
        _comm = MPI.COMM_WORLD
        _initialised = True
        return
    n = _expected_size()
    need = (n > 1) if require_horovod is None else require_horovod
    try:
        import horovod.torch as hvd  # noqa: WPS433 (the only import of horovod in hpc_dfs)
    except ImportError as e:
        if need:
            raise DistError(
                f"this job was launched with {n} processes ({launcher()}) but Horovod cannot be imported "
                f"({e}). Run `make setup` (it builds Horovod with PyTorch, MPI and Gloo) or activate the "
                f"environment that has it.") from None
        _initialised = True
        return
    lch = launcher()
    if lch in ("mpirun", "srun") and not hvd.mpi_built():
        raise DistError("launched by MPI but this Horovod was built without MPI: rebuild with HOROVOD_WITH_MPI=1 "
                        "(make setup does), or launch with `horovodrun --gloo`")
    if lch == "horovodrun-gloo" and not hvd.gloo_built():
        raise DistError("launched by `horovodrun --gloo` but this Horovod was built without Gloo: rebuild with "
                        "HOROVOD_WITH_GLOO=1 (make setup does), or launch with mpirun")
    if lch == "none" and hvd.gloo_built() and not hvd.mpi_built():
        raise DistError("this Horovod has only Gloo, which needs `horovodrun --gloo` even for one process")
    hvd.init()
    if n > 1 and hvd.size() != n:
        raise DistError(f"launcher says {n} processes but Horovod sees {hvd.size()}: the MPI library Horovod was "
                        f"built against differs from the launcher's (check `horovodrun --check-build`, "
                        f"`which mpirun`, and use srun --mpi=pmix or pmi2 as the cluster supports)")
    _hvd = hvd
    _initialised = True


def is_initialized() -> bool:
    return _initialised


def horovod_available() -> bool:
    return _hvd is not None


def _require() -> None:
    if not _initialised:
        init()


# ----------------------------------------------------------------------------- topology
def rank() -> int:
    _require()
    if _comm is not None:
        return _comm.Get_rank()
    return _hvd.rank() if _hvd else 0


def size() -> int:
    _require()
    if _comm is not None:
        return _comm.Get_size()
    return _hvd.size() if _hvd else 1


_local_comm = None


def _node_comm():
    global _local_comm
    if _local_comm is None:
        from mpi4py import MPI
        _local_comm = _comm.Split_type(MPI.COMM_TYPE_SHARED)
    return _local_comm


def local_rank() -> int:
    _require()
    if _comm is not None:
        return _node_comm().Get_rank()
    return _hvd.local_rank() if _hvd else 0


def local_size() -> int:
    _require()
    if _comm is not None:
        return _node_comm().Get_size()
    return _hvd.local_size() if _hvd else 1


def is_main() -> bool:
    return rank() == 0


def topology() -> dict:
    """A plain dict describing the job, for logs and checkpoints."""
    _require()
    info = {"rank": rank(), "size": size(), "local_rank": local_rank(), "local_size": local_size(),
            "launcher": launcher(), "host": os.uname().nodename, "horovod": _hvd is not None,
            "mpi4py": _comm is not None}
    if _hvd is not None:
        info.update(mpi=bool(_hvd.mpi_enabled()), gloo=bool(_hvd.gloo_enabled()),
                    nccl=bool(_hvd.nccl_built()))
    return info


# ----------------------------------------------------------------------------- device & threads
def device():
    """CUDA device ``local_rank % device_count()`` when CUDA is present, else CPU."""
    import torch
    if torch.cuda.is_available():
        idx = local_rank() % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def configure_threads(threads: int | None = None) -> int:
    """Give each rank its share of the node's cores: ``cores // local_size`` (at least 1).

    On 2 cores, ``mpirun -np 2`` with 2 threads per rank runs about 10x slower than with 1.
    Respects SLURM_CPUS_PER_TASK and OMP_NUM_THREADS when set.
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
_OPS = {"mean": "Average", "avg": "Average", "average": "Average", "sum": "Sum", "min": "Min", "max": "Max"}


def _op(op: str):
    try:
        return getattr(_hvd, _OPS[op.lower()])
    except KeyError:
        raise ValueError(f"unknown reduction '{op}' (use mean, sum, min or max)") from None


_counter = 0


def _name(prefix: str, name: str | None) -> str:
    global _counter
    if name:
        return name
    _counter += 1
    return f"{prefix}.{_counter}"


def _tensor_ops() -> None:
    _require()
    if _comm is not None:
        raise DistError("tensor collectives need Horovod: call dist.init() (not init(horovod=False)) in this stage")


def allreduce(tensor, op: str = "mean", name: str | None = None):
    """Allreduce a tensor (differentiable through Horovod). Returns a new tensor."""
    _tensor_ops()
    if _hvd is None:
        return tensor.clone()
    return _hvd.allreduce(tensor, op=_op(op), name=_name("allreduce", name))


def allreduce_(tensor, op: str = "mean", name: str | None = None):
    """In-place allreduce of a tensor."""
    _tensor_ops()
    if _hvd is None:
        return tensor
    return _hvd.allreduce_(tensor, op=_op(op), name=_name("allreduce_", name))


def allreduce_scalar(value: float, op: str = "mean", name: str | None = None) -> float:
    """Allreduce a Python number; returns a float on every rank (float64 on the wire)."""
    return float(allreduce_array([float(value)], op, name)[0])


def allreduce_array(values, op: str = "sum", name: str | None = None):
    """Allreduce a numpy array (float64 on the wire); returns a numpy array."""
    import numpy as np
    arr = np.asarray(values, dtype=np.float64)
    _require()
    if _comm is not None:
        from mpi4py import MPI
        mpi_op = {"mean": MPI.SUM, "avg": MPI.SUM, "average": MPI.SUM, "sum": MPI.SUM, "min": MPI.MIN,
                  "max": MPI.MAX}[op.lower()]
        out = np.empty_like(arr)
        _comm.Allreduce(arr, out, op=mpi_op)
        return out / _comm.Get_size() if op.lower() in ("mean", "avg", "average") else out
    import torch
    return allreduce(torch.as_tensor(arr), op, name).numpy()


def allgather(tensor, name: str | None = None):
    """Concatenate tensors of all ranks along dim 0 (first dims may differ)."""
    _tensor_ops()
    if _hvd is None:
        return tensor.clone()
    return _hvd.allgather(tensor, name=_name("allgather", name))


def broadcast_object(obj: Any, root: int = 0, name: str | None = None) -> Any:
    """Broadcast a picklable Python object from ``root``; returns it on every rank."""
    _require()
    if _comm is not None:
        return _comm.bcast(obj, root=root)
    if _hvd is None:
        return obj
    return _hvd.broadcast_object(obj, root_rank=root, name=_name("bcast_obj", name))


def allgather_object(obj: Any, name: str | None = None) -> list:
    """Gather one picklable object per rank; every rank gets the list in rank order."""
    _require()
    if _comm is not None:
        return _comm.allgather(obj)
    if _hvd is None:
        return [obj]
    return _hvd.allgather_object(obj, name=_name("gather_obj", name))


def gather_object(obj: Any, root: int = 0, name: str | None = None) -> list | None:
    """Like :func:`allgather_object` but only ``root`` keeps the list (others get None)."""
    out = allgather_object(obj, name)
    return out if rank() == root else None


def barrier() -> None:
    _require()
    if _comm is not None:
        _comm.Barrier()
    elif _hvd is not None and _hvd.size() > 1:
        _hvd.barrier()


def broadcast_model(model, root: int = 0) -> None:
    """Make every rank's parameters and buffers equal to ``root``'s."""
    _require()
    if _hvd is not None:
        _hvd.broadcast_parameters(model.state_dict(), root_rank=root)


def broadcast_parameters(params, root: int = 0) -> None:
    _require()
    if _hvd is not None:
        _hvd.broadcast_parameters(params, root_rank=root)


def broadcast_optimizer_state(optimizer, root: int = 0) -> None:
    _require()
    if _hvd is not None:
        _hvd.broadcast_optimizer_state(optimizer, root_rank=root)


def DistributedOptimizer(optimizer, named_parameters: Iterable | None = None, compression: str = "none",
                         op: str = "average", backward_passes_per_step: int = 1,
                         gradient_predivide_factor: float = 1.0):
    """``hvd.DistributedOptimizer`` with names for the options.

    compression: 'none' or 'fp16'; op: 'average' or 'adasum'. At size 1 without Horovod the
    optimizer is returned unchanged (and gets no-op ``synchronize``/``skip_synchronize``).
    """
    _require()
    if _hvd is None:
        import contextlib
        optimizer.synchronize = lambda: None
        optimizer.skip_synchronize = contextlib.nullcontext
        return optimizer
    comp = {"none": _hvd.Compression.none, "fp16": _hvd.Compression.fp16}
    if compression not in comp:
        raise ValueError(f"unknown gradient compression '{compression}' (use none or fp16)")
    ops = {"average": _hvd.Average, "adasum": _hvd.Adasum, "sum": _hvd.Sum}
    if op.lower() not in ops:
        raise ValueError(f"unknown gradient reduction '{op}' (use average or adasum)")
    return _hvd.DistributedOptimizer(
        optimizer, named_parameters=list(named_parameters) if named_parameters is not None else None,
        compression=comp[compression], op=ops[op.lower()], backward_passes_per_step=backward_passes_per_step,
        gradient_predivide_factor=gradient_predivide_factor)


def start_timeline(path: str, mark_cycles: bool = False) -> None:
    _require()
    if _hvd is not None:
        _hvd.start_timeline(path, mark_cycles=mark_cycles)


def stop_timeline() -> None:
    if _hvd is not None:
        _hvd.stop_timeline()


def abort(code: int = 1) -> None:
    """Kill the whole job: MPI_Abort under an MPI launcher, else exit this process.

    Called when one rank hits an error that the others would otherwise wait on forever.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if launcher() in ("mpirun", "srun"):
        try:
            from mpi4py import MPI  # noqa: WPS433 (mpi4py is used only here)
            MPI.COMM_WORLD.Abort(code)
        except Exception:  # pragma: no cover - fall through to a hard exit
            pass
    os._exit(code)


def shutdown() -> None:
    global _hvd, _comm, _initialised
    if _hvd is not None:
        _hvd.shutdown()
    _hvd = None
    _comm = None
    _initialised = False


# ----------------------------------------------------------------------------- logging
def rank_size_or_env() -> tuple[int, int]:
    """(rank, size) of this process: from the backend once initialised, else from the launcher's environment.

    Never initialises anything, so a logger can call it before :func:`init`.
    """
    if _initialised:
        return rank(), size()
    r = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK",
                       os.environ.get("PMIX_RANK", os.environ.get("SLURM_PROCID", "0"))))
    try:
        return int(r), _expected_size()
    except ValueError:
        return 0, 1


from hpc_dfs.dist.syncbn import SyncBatchNorm, convert_sync_batchnorm  # noqa: E402

__all__ = [
    "DistError", "init", "is_initialized", "horovod_available", "launcher", "rank", "size", "local_rank",
    "local_size", "is_main", "topology", "device", "configure_threads", "allreduce", "allreduce_",
    "allreduce_scalar", "allreduce_array", "allgather", "broadcast_object", "allgather_object", "gather_object",
    "barrier", "broadcast_model", "broadcast_parameters", "broadcast_optimizer_state", "DistributedOptimizer",
    "start_timeline", "stop_timeline", "abort", "shutdown", "rank_size_or_env", "SyncBatchNorm",
    "convert_sync_batchnorm",
]
