"""The one error base of hpc-dfs: every stage raises :class:`HpcDfsError` (or a subclass) for a problem
the user can fix, and only :func:`hpc_dfs.cli.main` catches it, prints one line and exits with its code.

    raise HpcDfsError("case_00012: imaging.nii.gz is truncated", code=EXIT_DATA)

Exit codes (stable, documented in CONTRACTS.md), defined here and nowhere else:

===  =====================================================================
 1   some cases failed but the others were written (preprocess, predict)
 2   bad setting or usage (as argparse)
 3   bad input data (a case, shard, checkpoint or table that cannot be used)
 4   environment (launcher, Horovod/MPI, disk full, missing tool)
 75  preempted: a checkpoint was written, requeue and ``--resume`` (EX_TEMPFAIL)
===  =====================================================================
"""
from __future__ import annotations

__all__ = ["HpcDfsError", "EXIT_USAGE", "EXIT_DATA", "EXIT_ENV", "EXIT_PARTIAL", "EXIT_PREEMPTED"]

EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_ENV = 4
#: a run that stopped on SIGUSR1/SIGTERM after writing ``last.pt`` (EX_TEMPFAIL): the sbatch script turns it
#: into ``scontrol requeue`` and the requeued job passes ``--resume``.
EXIT_PREEMPTED = 75


class HpcDfsError(Exception):
    """A problem the user can fix. ``str(err)`` is the one line printed; ``err.code`` the exit status.

    Args:
        message: one line naming the file or case and the problem.
        code: the exit status (default: the class's ``code``).
    """

    code: int = EXIT_DATA

    def __init__(self, message: str = "", code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
