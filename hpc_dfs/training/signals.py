"""Preemption: SIGUSR1 / SIGTERM set a flag; the loop agrees on it across ranks at step boundaries.

SLURM sends a signal before the time limit or on preemption (``#SBATCH --signal=USR1@120``; SIGTERM
on ``scancel`` and preemption). A signal may reach only some ranks, so the flag is combined across
ranks with an allreduce(max) at every step boundary (:meth:`Preemption.agreed`): all ranks then
stop after the same step, rank 0 writes ``last.pt`` and every rank exits with
:data:`hpc_dfs.errors.EXIT_PREEMPTED` (75, EX_TEMPFAIL), which the sbatch script turns into
``scontrol requeue``.
"""
from __future__ import annotations

import signal
from typing import Callable

__all__ = ["Preemption"]


class Preemption:
    """Catch SIGUSR1/SIGTERM (by default) into a flag; restore the old handlers on :meth:`uninstall`."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._old: dict = {}

    def install(self) -> "Preemption":
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        self.received = signum

    def agreed(self, reduce_max: Callable[[float], float]) -> bool:
        """True on every rank if any rank got a signal (``reduce_max`` = allreduce(max) of a number)."""
        return reduce_max(1.0 if self.received is not None else 0.0) > 0.0

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""
