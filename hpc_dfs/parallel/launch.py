"""What the launcher tells this process through its environment: how it was started, and its rank and size.

Read before any backend exists (the logger tags lines with the rank before :func:`hpc_dfs.parallel.init`), and
by :func:`hpc_dfs.parallel.init` to know how many processes the launcher started. Nothing here initialises
anything.
"""
from __future__ import annotations

import os

__all__ = ["launcher", "launch_rank_size"]

# First variable that holds an integer wins. Open MPI (mpirun), horovodrun (Gloo), PMI/PMIx (srun --mpi=...),
# then SLURM's own (srun without an MPI plugin; its task count only inside a job step).
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "SLURM_PROCID")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE")
_SLURM_STEP_SIZE_VAR = "SLURM_STEP_NUM_TASKS"


def launcher() -> str:
    """How this process was started.

    Returns:
        ``'horovodrun-gloo'``, ``'mpirun'``, ``'srun'`` or ``'none'`` (a plain process).
    """
    env = os.environ
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
    size_vars = _SIZE_VARS + ((_SLURM_STEP_SIZE_VAR,) if "SLURM_STEP_ID" in os.environ else ())
    rank, size = _first_int(_RANK_VARS), _first_int(size_vars)
    return (0 if rank is None else rank), (1 if size is None else size)
