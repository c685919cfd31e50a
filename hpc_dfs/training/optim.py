"""Optimizer, LR schedule and warm-up of ``hpc-dfs train`` (:func:`build_optimizer`, :func:`build_scheduler`).

The optimizer is wrapped in Horovod's ``DistributedOptimizer`` (through :mod:`hpc_dfs.parallel`): gradient
averaging, or Adasum, over the ranks. The per-epoch schedule steps on whole epochs only; the
warm-up (:func:`warmup_factor`) multiplies the scheduled rate for the first ``optim.warmup_epochs``.
"""
from __future__ import annotations

import torch

from hpc_dfs import parallel
from hpc_dfs.config.train import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "step_scheduler", "warmup_factor", "scaled_lrs"]


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, world: int):
    """SGD (Nesterov) or Adam at the scaled peak rate, wrapped for Horovod.

    Args:
        cfg: the run's settings (``optim``, ``horovod``, ``data`` sections).
        model: the network (on its device).
        world: number of ranks (sets the LR scale of weak scaling).
    """
    o = cfg.optim
    peak_lr = o.base_lr * cfg.lr_scale(world)
    if o.optimizer == "sgd":
        base = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=o.momentum,
                               nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
    else:
        base = torch.optim.Adam(model.parameters(), lr=peak_lr, weight_decay=o.weight_decay)
    h = cfg.horovod
    return parallel.DistributedOptimizer(base, model.named_parameters(), compression=h.compression,
                                     op="adasum" if h.adasum else "average",
                                     backward_passes_per_step=h.backward_passes_per_step)


def build_scheduler(cfg: TrainConfig, optimizer):
    """The per-epoch LR schedule of ``optim.lr_schedule`` (poly, cosine, plateau), or None."""
    schedule, epochs = cfg.optim.lr_schedule, cfg.schedule.epochs
    if schedule == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=epochs, power=0.9)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.optim.plateau_factor,
                                                          patience=cfg.optim.plateau_patience)
    return None


def step_scheduler(scheduler, val_loss: float | None) -> None:
    """One per-epoch step; ReduceLROnPlateau steps on the validation loss (and not at all without one)."""
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if val_loss is not None:
            scheduler.step(val_loss)
    else:
        scheduler.step()


def warmup_factor(step: int, warmup_steps: int, scale: float) -> float:
    """Linear ramp from the unscaled lr (1/scale of the scaled one) to the scaled lr (Goyal et al.)."""
    if scale <= 1.0 or warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return 1.0 / scale + (1.0 - 1.0 / scale) * step / warmup_steps


class scaled_lrs:
    """``with scaled_lrs(optimizer, f):`` multiplies every group's lr by ``f`` for one step, then restores it.

    The schedule's own rate is what the scheduler and the checkpoint see; the warm-up factor is applied
    around the optimizer step only.
    """

    def __init__(self, optimizer, factor: float) -> None:
        self.optimizer, self.factor = optimizer, factor
        self.lrs = [g["lr"] for g in optimizer.param_groups]

    def __enter__(self) -> "scaled_lrs":
        for g, lr in zip(self.optimizer.param_groups, self.lrs):
            g["lr"] = lr * self.factor
        return self

    def __exit__(self, *exc) -> None:
        for g, lr in zip(self.optimizer.param_groups, self.lrs):
            g["lr"] = lr
