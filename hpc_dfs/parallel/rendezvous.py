"""Where the torch engine's ranks meet: rank, size, local rank and size, and the master's address and port.

Read from the launcher's environment, one launcher at a time (:func:`rendezvous`):

- **torchrun**: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``
  (torchrun's own store, ``env://``).
- **srun** (SLURM, no MPI needed): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``),
  ``SLURM_LOCALID``, the node's share of ``SLURM_STEP_TASKS_PER_NODE``; the master is the first host of
  ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``; ``scontrol show hostnames``, else a parse of the
  list), the port :func:`slurm_port` of the job and step ids.
- **mpirun** (Open MPI): ``OMPI_COMM_WORLD_RANK``/``SIZE``/``LOCAL_RANK``/``LOCAL_SIZE``; rank 0 picks its host
  name and a free port and broadcasts them with mpi4py (works across nodes, and two jobs on one node never
  meet on the same port).
- a plain process: rank 0 of 1 on 127.0.0.1 and a free port.

``MASTER_ADDR`` and ``MASTER_PORT`` set in the environment win under every launcher. Nothing here starts a
process group; :class:`hpc_dfs.parallel.torch_backend.TorchBackend` does.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass

from hpc_dfs.parallel.launch import launcher

__all__ = ["Rendezvous", "rendezvous", "slurm_port", "first_host", "tasks_on_node"]

#: the ports :func:`slurm_port` derives from a job id lie in [PORT_BASE, PORT_BASE + PORT_SPAN)
PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class Rendezvous:
    """How this rank joins the job (see the module docstring)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    addr: str
    port: int
    init_method: str   # "env://" under torchrun (its store), else "tcp://addr:port"


def _int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        if default is None:
            raise KeyError(name)
        return default
    return int(value)


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """The master port of a SLURM job step: the same on every rank, different for the job's next steps.

    Args:
        job_id: ``SLURM_JOB_ID``.
        step_id: ``SLURM_STEP_ID`` (a batch script's second ``srun`` gets another port).
    """
    return PORT_BASE + (job_id * 7 + step_id) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list (``node[01-04,07],gpu2`` -> ``node01``).

    Asks ``scontrol show hostnames`` (bounded to 10 s); where that is missing or fails, parses the list.
    """
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        return nodelist
    prefix, ranges = head.group(1), head.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's task count from SLURM's compressed list (``2(x3),1`` -> node 0..2: 2, node 3: 1)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else (counts[0] if counts else 1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _tcp(rank: int, size: int, local_rank: int, local_size: int, addr: str, port: int) -> Rendezvous:
    addr = os.environ.get("MASTER_ADDR", addr)
    port = _int("MASTER_PORT", port)
    return Rendezvous(rank, size, local_rank, local_size, addr, port, f"tcp://{addr}:{port}")


def _from_torchrun() -> Rendezvous:
    return Rendezvous(_int("RANK"), _int("WORLD_SIZE"), _int("LOCAL_RANK", 0), _int("LOCAL_WORLD_SIZE", 1),
                      os.environ.get("MASTER_ADDR", "127.0.0.1"), _int("MASTER_PORT", 29500), "env://")


def _from_slurm() -> Rendezvous:
    size = _int("SLURM_STEP_NUM_TASKS", _int("SLURM_NTASKS", 1))
    local_size = tasks_on_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE",
                                              os.environ.get("SLURM_TASKS_PER_NODE", str(size))),
                               _int("SLURM_NODEID", 0))
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    port = slurm_port(_int("SLURM_JOB_ID", 0), _int("SLURM_STEP_ID", 0))
    return _tcp(_int("SLURM_PROCID"), size, _int("SLURM_LOCALID", 0), local_size, first_host(nodelist), port)


def _from_open_mpi() -> Rendezvous:
    from mpi4py import MPI  # mpi4py is imported only in hpc_dfs/parallel
    comm = MPI.COMM_WORLD
    here = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    addr, port = comm.bcast(here, root=0)
    if comm.Get_size() > 1 and all(h == addr for h in comm.allgather(socket.gethostname())):
        addr = "127.0.0.1"  # one node: the loopback, whatever the host name resolves to
    return _tcp(comm.Get_rank(), comm.Get_size(), _int("OMPI_COMM_WORLD_LOCAL_RANK", 0),
                _int("OMPI_COMM_WORLD_LOCAL_SIZE", 1), addr, port)


def rendezvous() -> Rendezvous:
    """This rank's :class:`Rendezvous`, read from the launcher that started it (see the module docstring).

    Raises:
        KeyError: a variable the launcher should have set is missing or not a number.
        ImportError: under mpirun without mpi4py.
    """
    lch = launcher()
    if lch == "torchrun":
        return _from_torchrun()
    if lch == "mpirun" and "OMPI_COMM_WORLD_SIZE" in os.environ:
        return _from_open_mpi()
    if lch == "srun" or (lch == "mpirun" and "SLURM_PROCID" in os.environ):
        return _from_slurm()
    if lch == "none":
        return _tcp(0, 1, 0, 1, "127.0.0.1", _free_port())
    raise KeyError(f"launcher {lch} (use torchrun, srun or mpirun for the torch engine)")
