"""Rank-tagged logging for every stage: ``HH:MM:SS [rank r/N] LEVEL name: message``.

    from hpc_dfs.log import get_logger
    log = get_logger("hpc_dfs.train")

Rank 0 logs at INFO and the other ranks at WARNING (so their errors still show), unless
``HPC_DFS_LOG_LEVEL`` or ``level`` says otherwise. The rank comes from :mod:`hpc_dfs.parallel` once it is
initialised, and from the launcher's environment before that.
"""
from __future__ import annotations

import logging
import os
import sys

from hpc_dfs import parallel

__all__ = ["get_logger"]


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        r, n = parallel.rank_size_or_env()
        record.rank_tag = f"[rank {r}/{n}]"
        return True


def get_logger(name: str = "hpc_dfs", level: int | str | None = None) -> logging.Logger:
    """The ``hpc_dfs`` logger (or a child of it), configured once with the rank-tagged format."""
    root = logging.getLogger("hpc_dfs")
    if not getattr(root, "_hpc_dfs_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(rank_tag)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
        root._hpc_dfs_configured = True  # type: ignore[attr-defined]
    env_level = os.environ.get("HPC_DFS_LOG_LEVEL")
    if level is None and env_level:
        level = env_level.upper()
    if level is None:
        level = logging.INFO if parallel.rank_size_or_env()[0] == 0 else logging.WARNING
    root.setLevel(level)
    return logging.getLogger(name if name.startswith("hpc_dfs") else f"hpc_dfs.{name}")
