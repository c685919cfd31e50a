"""Parameters and FLOPs of every model in :data:`hpc_dfs.models.MODELS` (``hpc-dfs models`` prints them).

FLOPs are 2 x multiply-adds (see ``CONVENTION`` and the ``hpc-dfs models`` docstring), counted on the
``meta`` device, so the count takes no memory.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_parameters", "count_flops", "model_summary"]

CONVENTION = ("FLOPs = 2 x multiply-adds of conv/transposed-conv/matmul (incl. GRU and linear layers), "
              "forward pass, batch of 1, counted by torch.utils.flop_counter.FlopCounterMode; "
              "norm/activation/pooling not counted; gflops = FLOPs / 1e9")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; shared parameters are counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _default_inputs(model: nn.Module, input_shape: Sequence[int]) -> tuple[torch.Tensor, ...]:
    from .clinical_gru import ClinicalGRU
    from .fusion import DFSFusion

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    shape = tuple(int(s) for s in input_shape)
    if isinstance(model, ClinicalGRU):
        if len(shape) != 2:
            raise ValueError(f"ClinicalGRU FLOPs need an input shape [B, F], got {shape}")
        return (torch.zeros(shape, device=device),)
    if len(shape) != 4:
        raise ValueError(f"image models need an input shape [B, C, H, W], got {shape}")
    image = torch.zeros(shape, device=device)
    if isinstance(model, DFSFusion):
        if model.clinical_encoder is None:
            return image, None
        return image, torch.zeros(shape[0], model.n_clinical, device=device)
    return (image,)


def count_flops(model: nn.Module, input_shape: Sequence[int] = (1, 1, 512, 512),
                inputs: Sequence[torch.Tensor | None] | None = None) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass, in eval mode, without gradients.

    Args:
        model: any model of this package (on any device, ``meta`` included).
        input_shape: ``[B, C, H, W]`` of the image (``[B, F]`` for :class:`ClinicalGRU`); a DFS
            model also gets a zero clinical tensor ``[B, n_clinical]``.
        inputs: explicit forward arguments instead of ``input_shape``.
    """
    args = tuple(inputs) if inputs is not None else _default_inputs(model, input_shape)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(*args)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_summary(size: Sequence[int] = (512, 512), n_clinical: int = 24, n_classes: int = 3) -> dict:
    """``{name: {"params", "gflops"}}`` for every model of :func:`hpc_dfs.models.build_model`, plus ``"_meta"``."""
    from . import MODELS, ClinicalGRU, UNet, build_model

    h, w = (int(s) for s in size)
    if h < 1 or w < 1 or n_clinical < 1:
        raise ValueError(f"--size must be positive and --n-clinical >= 1, got size {h}x{w}, n_clinical {n_clinical}")
    paper_unet = dict(in_channels=3, n_classes=1)  # the paper's Table 5 configuration
    out: dict = {}
    with torch.device("meta"):
        for name, cls in MODELS.items():
            kwargs = paper_unet if cls is UNet else dict(n_classes=n_classes, n_clinical=n_clinical)
            model = build_model(name, **kwargs)
            shape = (1, n_clinical) if cls is ClinicalGRU else (1, kwargs.get("in_channels", 1), h, w)
            out[name] = {"params": count_parameters(model), "gflops": round(count_flops(model, shape) / 1e9, 9)}
    out["_meta"] = {
        "convention": CONVENTION,
        "size": [h, w],
        "n_clinical": n_clinical,
        "n_classes": n_classes,
        "unet": "Ronneberger U-Net, 64 base channels, 4 poolings, no norm, 3 input channels -> 1 output "
                "(the paper's Table 5 count); with 1 input channel it has 31,030,593 parameters",
        "rusp_net": "base 32, depth 4, dense 3x3 convs, batch norm",
        "rusp_net_dw": "base 32, depth 4, depthwise-separable convs, batch norm",
        "dfs_fusion": "rusp_net_dw + clinical GRU encoder + FiLM + late-fusion risk head",
    }
    return out
