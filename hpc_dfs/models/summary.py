"""Parameters and FLOPs of every model: ``hpc-dfs models [--json] [--size H W] [--n-clinical F]``.

Convention: FLOPs = 2 x multiply-adds of the convolutions, transposed convolutions and matrix
products (GRU and linear layers included), counted by :class:`torch.utils.flop_counter.FlopCounterMode`
for one forward pass of a batch of one ``1 x H x W`` slice (default 512 x 512) and, for the clinical
models, one record of ``F`` features. Normalisation, activations, pooling and additions are not
counted (they are a few percent at most). Models are built on PyTorch's ``meta`` device, so the count
takes no memory and well under a second even for the 31M-parameter U-Net.

The ``unet`` row is the paper's Table 5 baseline: Ronneberger's U-Net, 64 base channels, 4 poolings,
no normalisation, **3 input channels** and 1 output channel, which counts exactly 31,031,745
parameters (with 1 input channel it is 31,030,593; see :mod:`hpc_dfs.models.unet`).

Example::

    $ hpc-dfs models --json
    {"unet": {"params": 31031745, "gflops": 385.34}, "rusp_net": {...}, ..., "_meta": {...}}
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
    from . import build_model

    h, w = (int(s) for s in size)
    if h < 1 or w < 1 or n_clinical < 1:
        raise ValueError(f"--size must be positive and --n-clinical >= 1, got size {h}x{w}, n_clinical {n_clinical}")
    specs = {
        "unet": dict(in_channels=3, n_classes=1),  # the paper's Table 5 configuration
        "rusp_net": dict(n_classes=n_classes),
        "rusp_net_dw": dict(n_classes=n_classes),
        "clinical_gru": dict(n_clinical=n_clinical),
        "dfs_fusion": dict(n_classes=n_classes, n_clinical=n_clinical),
    }
    out: dict = {}
    with torch.device("meta"):
        for name, kwargs in specs.items():
            model = build_model(name, **kwargs)
            shape = (1, n_clinical) if name == "clinical_gru" else (1, kwargs.get("in_channels", 1), h, w)
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
