"""Classical U-Net (Ronneberger et al., 2015) and the building blocks shared with RUSP-Net.

The U-Net here is the paper's baseline (DFS paper, Table 5): 64 base channels, 4 poolings, two
3x3 convolutions (with bias) + ReLU per level, 2x2 max-pooling, 2x2 transposed-convolution
"up-convolutions" that halve the channels, concatenation with the encoder skip, and a final 1x1
convolution. Convolutions are zero-padded ("same"), so the output has the input's size.

Parameter count (trainable), checked in ``tests/unit/models/test_models.py``:

- ``UNet(in_channels=3, out_channels=1)``: **31,031,745**, exactly the paper's Table 5 figure;
- ``UNet(in_channels=1, out_channels=1)``: 31,030,593.

The paper's figure differs from the one-channel count by 1,152 = 2 x (3 x 3 x 64), i.e. two more
input channels in the first convolution: it is the count of the Keras-style 3-channel-input U-Net.
We found no variant with one input channel that gives 31,031,745 (we enumerated BatchNorm or
not, convolution and up-convolution biases, 2x2 or 3x3 up-convolutions, 1x1 or Keras-style
3x3-then-1x1 heads). The original U-Net has no normalisation; ``norm="batch"`` (or
``"instance"``/``"group"``) adds it for use as a trained baseline.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UNet", "make_norm", "pad_to_multiple", "NORMS"]

NORMS = ("batch", "instance", "group", "none")


def make_norm(norm: str | None, channels: int) -> nn.Module:
    """Normalisation layer by name.

    Args:
        norm: ``"batch"`` (plain :class:`torch.nn.BatchNorm2d`, so that the trainer can swap it for a
            rank-synchronised batch norm), ``"instance"`` (affine :class:`torch.nn.InstanceNorm2d`),
            ``"group"`` (:class:`torch.nn.GroupNorm` with up to 8 groups) or ``"none"``/``None``.
        channels: number of channels to normalise.
    """
    if norm is None or norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm '{norm}' (choose one of {', '.join(NORMS)})")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad the last two dims of ``x`` (bottom/right) up to a multiple of ``multiple``.

    Returns the padded tensor and the original ``(H, W)`` so the caller can crop back with
    ``y[..., :H, :W]``. Padding only at the bottom/right keeps pixel ``(i, j)`` of the output aligned
    with pixel ``(i, j)`` of the input.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, (h, w)


class _DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2; convolutions keep their bias only when there is no norm."""

    def __init__(self, in_ch: int, out_ch: int, norm: str | None) -> None:
        bias = norm in (None, "none")
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias), make_norm(norm, out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias), make_norm(norm, out_ch), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Ronneberger's U-Net with "same" padding, for any input size.

    Args:
        in_channels: input channels (1 for CT; 3 reproduces the paper's 31,031,745 parameters).
        out_channels: output channels (logits; 1 for the paper's binary baseline).
        base_channels: channels of the first level; level ``i`` has ``base * 2**i``.
        depth: number of poolings (4 in the paper).
        norm: ``"none"`` (original U-Net), ``"batch"``, ``"instance"`` or ``"group"``.

    Inputs of any ``H x W`` are zero-padded to a multiple of ``2**depth`` and the output is
    cropped back, so ``forward(x).shape[-2:] == x.shape[-2:]``.
    """

    #: image only: ``forward(image)`` (callers ask this attribute, not the model name)
    takes_clinical = False

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 64, depth: int = 4,
                 norm: str | None = "none") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"UNet depth must be >= 1, got {depth}")
        chans = [base_channels * 2 ** i for i in range(depth + 1)]
        self.depth = depth
        self.encoders = nn.ModuleList()
        c = in_channels
        for ch in chans[:-1]:
            self.encoders.append(_DoubleConv(c, ch, norm))
            c = ch
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _DoubleConv(chans[-2], chans[-1], norm)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in reversed(range(depth)):
            self.ups.append(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2))
            self.decoders.append(_DoubleConv(2 * chans[i], chans[i], norm))
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, 2 ** self.depth)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)[..., :h, :w]

