"""Training stops with one clear error when its numbers stop being numbers.

A NaN or infinite loss (``--lr 1e12``, a loss weight of NaN, a data set that slipped a non-finite voxel past
its checks) or gradient norm is a :class:`NonFiniteError` at the step where it appears, before the optimizer
applies it: the run writes no checkpoint of non-finite weights and never marks such an epoch ``best``; the
last good ``last.pt`` (if any) stays as it was. Every rank sees the same global loss and averaged gradient,
so every rank raises at the same step (no rank waits in a collective).
"""
from __future__ import annotations

import math

from hpc_dfs.errors import EXIT_DATA, HpcDfsError

__all__ = ["NonFiniteError", "check_loss", "check_grad_norm", "clip_and_check", "check_metrics"]

_ADVICE = ("training diverged: lower --lr (or raise --grad-clip), check the loss.* weights, and check the shards "
           "with ShardSet.validate(deep=True); no checkpoint of this step was written")


class NonFiniteError(HpcDfsError):
    """The loss, a gradient or a validation metric is NaN or infinite (exit 3)."""

    code = EXIT_DATA


def check_loss(loss: float, step: int, epoch: int) -> None:
    """Raise when the global batch's loss of optimizer step ``step`` is not finite.

    Args:
        loss: the global batch's loss.
        step: the optimizer step (1-based, as logged).
        epoch: the epoch (0-based) the step belongs to.

    Raises:
        NonFiniteError: NaN or inf, naming the step and epoch.
    """
    if not math.isfinite(loss):
        raise NonFiniteError(f"epoch {epoch + 1}, step {step}: the training loss is {loss}; {_ADVICE}")


def check_grad_norm(norm: float, step: int) -> None:
    """Raise when the averaged gradient's norm is not finite (before the optimizer steps with it).

    Args:
        norm: the global gradient norm (after averaging over ranks).
        step: the optimizer step about to be taken (1-based).

    Raises:
        NonFiniteError: NaN or inf, naming the step.
    """
    if not math.isfinite(norm):
        raise NonFiniteError(f"step {step}: the gradient norm is {norm}; {_ADVICE}")


def clip_and_check(params, clip: float, step: int, check: bool = True) -> None:
    """Clip the global gradient norm to ``clip`` (0: no clipping) and, with ``check``, refuse a non-finite norm.

    Args:
        params: the model's parameters, gradients averaged over ranks.
        clip: the largest norm (``optim.grad_clip``); 0 leaves the gradients as they are (x 1.0, exactly).
        step: the optimizer step about to be taken (1-based).
        check: raise on a non-finite norm (off under fp16, whose scaler skips such a step by design).

    Raises:
        NonFiniteError: the norm is NaN or inf.
    """
    import torch

    if clip <= 0 and not check:
        return
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    if check:
        check_grad_norm(float(norm), step)


def check_metrics(metrics: dict, epoch: int) -> dict:
    """``metrics``, unless validation gave a non-finite loss: such an epoch is never kept, and never ``best``.

    Args:
        metrics: :meth:`Trainer.validate`'s result.
        epoch: the epoch (0-based).

    Returns:
        ``metrics``.

    Raises:
        NonFiniteError: ``val_loss`` is NaN or inf while there were cases to validate.
    """
    v = metrics.get("val_loss")
    if metrics.get("n_val_cases", 1) and isinstance(v, float) and not math.isfinite(v):
        raise NonFiniteError(f"epoch {epoch + 1}: the validation loss is {v}; {_ADVICE}")
    return metrics
