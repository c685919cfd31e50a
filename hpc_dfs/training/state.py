"""The training loop's state (:class:`TrainState`): what a checkpoint carries besides weights and optimizer.

``epoch`` counts completed epochs and ``step`` optimizer steps, so the next step belongs to epoch
``step // steps_per_epoch`` at position ``step % steps_per_epoch``: a run resumed from a mid-epoch
checkpoint (preemption) continues exactly where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from hpc_dfs.training.metrics import clean

__all__ = ["TrainState"]


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
