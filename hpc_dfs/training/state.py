"""The training loop's state (:class:`TrainState`): what a checkpoint carries besides weights and optimizer; and
the epoch's running statistics (:class:`EpochStats`).

``epoch`` counts completed epochs and ``step`` optimizer steps, so the next step belongs to epoch
``step // steps_per_epoch`` at position ``step % steps_per_epoch``: a run resumed from a mid-epoch
checkpoint (preemption) continues exactly where it stopped.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from hpc_dfs.training.metrics import clean

__all__ = ["TrainState", "Timer", "EpochStats", "seed_everything"]


@dataclass
class TrainState:
    """Epoch, step, best score, RNG states of every rank and the validation metrics history."""

    epoch: int = 0                        # completed epochs
    step: int = 0                         # optimizer steps in all
    best_score: float = -math.inf         # hpc_dfs.training.metrics.score of the best validation so far
    best_epoch: Optional[int] = None
    metrics: dict = field(default_factory=dict)    # the latest validation metrics
    history: list = field(default_factory=list)    # this process's epoch rows (metrics.jsonl holds all)
    rng: list = field(default_factory=list)        # per rank: checkpoint.capture_rng(), to restore on resume

    def improved(self, score: float) -> bool:
        """Record ``score`` of the epoch just finished; True when it is the best so far."""
        if score > self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            return True
        return False

    def checkpoint_metrics(self) -> dict:
        """The checkpoint's ``metrics`` entry: the latest validation metrics (no per-case rows) and the best."""
        latest = {k: v for k, v in self.metrics.items() if k != "per_case"}
        return clean({**latest, "best_score": self.best_score, "best_epoch": self.best_epoch})

    @classmethod
    def from_checkpoint(cls, meta: dict) -> "TrainState":
        """The state stored in a checkpoint (its ``epoch``, ``step``, ``metrics`` and ``rng`` entries)."""
        metrics = dict(meta.get("metrics") or {})
        best = metrics.get("best_score")
        return cls(epoch=int(meta["epoch"]), step=int(meta["step"]), metrics=metrics,
                   best_score=best if best is not None else -math.inf, best_epoch=metrics.get("best_epoch"),
                   rng=list(meta.get("rng") or []))


class Timer:
    """Accumulates wall time spent inside ``with timer:`` blocks."""

    def __init__(self) -> None:
        self.total = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._t0


@dataclass
class EpochStats:
    """Loss and timings of the epoch being trained (one rank)."""

    t0: float = field(default_factory=time.perf_counter)
    loss_sum: float = 0.0
    n_steps: int = 0
    sync: Timer = field(default_factory=Timer)      # waiting for the gradient allreduce
    train_time: float = 0.0


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators.

    Args:
        seed: the run's seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
