"""Dropout whose masks can come from per-sample seeds (:class:`SampleDropout`), for rank-invariant training.

``nn.Dropout`` draws its mask from the process's RNG, so a sample's mask depends on which rank
holds it and what that rank drew before: 2 ranks cannot reproduce a 1-rank run. Inside
``with per_sample_dropout(model, seeds):`` every :class:`SampleDropout` of ``model`` draws sample
``i``'s mask from its own generator seeded with ``seeds[i]`` (and the layer's position in the model), so
the mask is a function of the seed alone. The caller chooses the seeds (e.g. from the run seed, the
step and the sample's index in the global batch); the model knows nothing of ranks. Outside the
context, or in eval mode, it is exactly ``nn.Dropout`` (same RNG use, same state dict: no parameters).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

__all__ = ["SampleDropout", "per_sample_dropout"]

_LAYER_STRIDE = 0x9E3779B97F4A7C15   # odd 64-bit constant: distinct layers get distinct generator seeds


class SampleDropout(nn.Dropout):
    """``nn.Dropout`` that, when given ``sample_seeds``, draws each sample's mask from its own seed.

    Args:
        p: probability of an element to be zeroed.
        inplace: as for ``nn.Dropout`` (ignored when drawing per-sample masks).
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        self.sample_seeds: Sequence[int] | None = None
        self.layer_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seeds = self.sample_seeds
        if seeds is None or not self.training or self.p == 0.0:
            return super().forward(x)
        if len(seeds) != x.shape[0]:
            raise ValueError(f"SampleDropout got {len(seeds)} sample seeds for a batch of {x.shape[0]}")
        keep = torch.empty(x.shape, dtype=torch.float32)
        for i, seed in enumerate(seeds):
            g = torch.Generator().manual_seed((int(seed) + _LAYER_STRIDE * (self.layer_index + 1)) % 2**63)
            keep[i] = torch.rand(x.shape[1:], generator=g) >= self.p
        return x * (keep / (1.0 - self.p)).to(device=x.device, dtype=x.dtype)


@contextlib.contextmanager
def per_sample_dropout(model: nn.Module, seeds: Sequence[int] | None) -> Iterator[int]:
    """Within the block, every :class:`SampleDropout` of ``model`` draws per-sample masks from ``seeds``.

    Args:
        model: any module.
        seeds: one integer per sample of the batch about to go through ``model``; None leaves dropout as is.

    Yields:
        the number of SampleDropout layers found.
    """
    layers = [m for m in model.modules() if isinstance(m, SampleDropout)] if seeds is not None else []
    for index, m in enumerate(layers):
        m.sample_seeds, m.layer_index = list(seeds), index
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.sample_seeds = None
