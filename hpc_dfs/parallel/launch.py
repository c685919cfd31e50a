"""What the launcher tells this process through its environment: how it was started, and its rank and size.

Read before any backend exists (the logger tags lines with the rank before :func:`hpc_dfs.parallel.init`), and
by :func:`hpc_dfs.parallel.init` to know how many processes the launcher started. Nothing here initialises
anything.
"""
from __future__ import annotations

import os

__all__ = ["launcher", "launch_rank_size", "ENGINES", "ENGINE_ENV", "requested_engine"]

#: the gradient engines: Horovod (the default) and torch.distributed (Gloo on CPU, NCCL on CUDA)
ENGINES = ("horovod", "torch")
#: the environment variable that picks the engine when the command line and the config do not
ENGINE_ENV = "HPC_DFS_ENGINE"

# First variable that holds an integer wins. Open MPI (mpirun), horovodrun (Gloo), PMI/PMIx (srun --mpi=...),
# then SLURM's own (srun without an MPI plugin; its task count only inside a job step).
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "SLURM_PROCID")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE")
_SLURM_STEP_SIZE_VAR = "SLURM_STEP_NUM_TASKS"


def launcher() -> str:
    """How this process was started.

    Returns:
        ``'torchrun'``, ``'horovodrun-gloo'``, ``'mpirun'``, ``'srun'`` or ``'none'`` (a plain process).
        torchrun wins over SLURM's variables (one torchrun per node, started by srun).
    """
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "HOROVOD_GLOO_RENDEZVOUS_ADDR" in env:
        return "horovodrun-gloo"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "PMIX_RANK" in env:
        return "srun" if "SLURM_STEP_ID" in env and "OMPI_COMM_WORLD_SIZE" not in env else "mpirun"
    if "SLURM_STEP_ID" in env and int(env.get(_SLURM_STEP_SIZE_VAR, "1")) > 1:
        return "srun"
    return "none"


def _first_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return None


def launch_rank_size() -> tuple[int, int]:
    """(rank, size) of this process as the launcher's environment states them; (0, 1) for a plain process.

    This is the one place that reads the rank and the size from the environment. Once a backend is chosen,
    ask it instead (:func:`hpc_dfs.parallel.rank_size_or_env` does).

    Returns:
        ``(rank, size)``.
    """
    if launcher() == "torchrun":
        rank, size = _first_int(("RANK",)), _first_int(("WORLD_SIZE",))
        return (0 if rank is None else rank), (1 if size is None else size)
    size_vars = _SIZE_VARS + ((_SLURM_STEP_SIZE_VAR,) if "SLURM_STEP_ID" in os.environ else ())
    rank, size = _first_int(_RANK_VARS), _first_int(size_vars)
    return (0 if rank is None else rank), (1 if size is None else size)


def requested_engine(engine: str | None = None) -> str:
    """The engine this process should start: ``engine``, else ``$HPC_DFS_ENGINE``, else ``torch`` under torchrun
    (which starts no Horovod) and ``horovod`` everywhere else.

    Args:
        engine: the setting of the command line or config (None: not set).

    Returns:
        ``'horovod'`` or ``'torch'``.

    Raises:
        ValueError: for another name (the message names where it came from).
    """
    where = "--engine"
    if not engine:
        engine, where = os.environ.get(ENGINE_ENV, "").strip().lower(), f"${ENGINE_ENV}"
    if not engine:
        return "torch" if launcher() == "torchrun" else "horovod"
    if engine not in ENGINES:
        raise ValueError(f"{where}={engine!r}: the engine is one of {', '.join(ENGINES)}")
    return engine
