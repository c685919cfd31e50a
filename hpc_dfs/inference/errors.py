"""The two errors of inference: one stops the run before any case, the other skips one case."""
from __future__ import annotations

from hpc_dfs.errors import EXIT_DATA, EXIT_USAGE, HpcDfsError

__all__ = ["PredictError", "InferenceError"]


class PredictError(HpcDfsError):
    """A run-level problem (checkpoints, input path, device): stops the run before any case, exit code 2."""

    code = EXIT_USAGE


class InferenceError(HpcDfsError):
    """A problem with one case: the case is skipped, the run goes on and exits with 1 (caught in :func:`run`)."""

    code = EXIT_DATA
