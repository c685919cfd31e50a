"""What ran, for ``RUN/run.json`` (:class:`hpc_dfs.contracts.run.RunInfo`): versions, commit, device, launcher."""
from __future__ import annotations

import torch

from hpc_dfs import __version__, parallel
from hpc_dfs.contracts.run import RunInfo, git_commit, package_version

__all__ = ["what_ran"]


def what_ran(device: torch.device) -> RunInfo:
    """This job's software and placement, read on rank 0 once the engine is up.

    Args:
        device: the device the model trains on (``hpc_dfs.parallel.device()``).
    """
    topo = parallel.topology()
    engine = "horovod" if topo.get("horovod") else "mpi4py" if topo.get("mpi4py") else "single process"
    version = package_version(engine) if engine in ("horovod", "mpi4py") else None
    return RunInfo(hpc_dfs_version=__version__, torch=torch.__version__, engine=engine, engine_version=version,
                   git_commit=git_commit(), device=str(device), launcher=topo["launcher"], world_size=topo["size"])
