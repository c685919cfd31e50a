"""RUSP-Net: residual U-Net with spatial pyramid pooling, for 2D axial CT slices.

The architecture follows the DFS paper's description:

- **Encoder** level ``i``: two 3x3 conv + norm + ReLU giving ``H_i``, then 2x2 max-pooling.
- **Bottleneck**: two 3x3 conv + norm + ReLU, then **spatial pyramid pooling** (SPP): three
  parallel 3x3 convolutions at dilation 1, 2 and 3 whose outputs are concatenated; the
  concatenation is the bottleneck output that the decoder upsamples.
- **Decoder** level ``i``: 2x2 transposed convolution, concatenation with the encoder skip ``H_i``,
  two 3x3 conv + norm + ReLU giving ``G_i``, and the **residual connection** ``R_i = H_i + G_i``
  between the encoder and decoder levels. The final decoder level(s) use **dilated** 3x3
  convolutions (dilation ``decoder_dilation``) to widen the receptive field at full resolution.
- **Output**: ``Y = conv1x1(relu(conv3x3(concat(R_0, up(SPP)))))``, where ``up(SPP)`` is the SPP
  output, projected by a 1x1 convolution to ``base_channels`` at low resolution (so the full-
  resolution concatenation stays cheap) and bilinearly upsampled to the input size.

Options: depthwise-separable convolutions (``separable=True``, the paper's lightweight variant;
``build_model("rusp_net_dw")``; the 2x2 up-convolutions then become a low-resolution 1x1 followed by
a depthwise 2x2 transposed convolution), width (``base_channels``) and depth, the norm layer, and
``channels_last`` memory format. Inputs of any size are zero-padded to a multiple of ``2**depth``
and the outputs are cropped back. Nothing in the network casts dtypes, so it runs under
``torch.autocast`` (float16/bfloat16).

Conditioning hook: :meth:`RUSPNet.forward` accepts per-channel ``(gamma, beta)`` pairs for the
bottleneck (after SPP) and for ``R_0`` (the last decoder features); :class:`~hpc_dfs.models.fusion.DFSFusion`
uses it for FiLM fusion with the clinical embedding.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .unet import make_norm, pad_to_multiple

__all__ = ["RUSPNet", "conv3x3", "up_conv2x2", "ConvNormAct", "SpatialPyramidPooling", "apply_film"]


def conv3x3(in_ch: int, out_ch: int, dilation: int = 1, separable: bool = False, bias: bool = False) -> nn.Module:
    """3x3 convolution with "same" padding, dense or depthwise-separable.

    The separable form is a depthwise 3x3 convolution (``groups=in_ch``) followed by a pointwise
    1x1 convolution: ``9*in + in*out`` weights instead of ``9*in*out``.
    """
    if not separable:
        return nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=bias)
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, padding=dilation, dilation=dilation, groups=in_ch, bias=False),
        nn.Conv2d(in_ch, out_ch, 1, bias=bias),
    )


class ConvNormAct(nn.Sequential):
    """3x3 conv (dense or separable, optionally dilated) -> norm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, norm: str | None, dilation: int = 1, separable: bool = False) -> None:
        has_norm = norm not in (None, "none")
        super().__init__(conv3x3(in_ch, out_ch, dilation, separable, bias=not has_norm),
                         make_norm(norm, out_ch), nn.ReLU(inplace=True))


class _Block(nn.Sequential):
    """Two :class:`ConvNormAct` layers (the paper's "two 3x3 conv + BN + ReLU")."""

    def __init__(self, in_ch: int, out_ch: int, norm: str | None, dilation: int = 1, separable: bool = False) -> None:
        super().__init__(ConvNormAct(in_ch, out_ch, norm, dilation, separable),
                         ConvNormAct(out_ch, out_ch, norm, dilation, separable))


class SpatialPyramidPooling(nn.Module):
    """Parallel 3x3 convolutions at several dilations, concatenated (the paper's SPP).

    The output has ``branch_channels * len(dilations)`` channels and is the bottleneck output that
    the decoder upsamples (no 1x1 merge, which would cost ``(3b) x C`` weights for nothing the
    first up-convolution cannot do).

    Args:
        channels: input channels.
        branch_channels: channels of each parallel branch.
        dilations: one branch per dilation (the paper: 1, 2, 3).
        norm: norm layer name.
        separable: depthwise-separable branches.
    """

    def __init__(self, channels: int, branch_channels: int, dilations: Sequence[int] = (1, 2, 3),
                 norm: str | None = "batch", separable: bool = False) -> None:
        super().__init__()
        if not dilations:
            raise ValueError("SpatialPyramidPooling needs at least one dilation")
        self.branches = nn.ModuleList(
            ConvNormAct(channels, branch_channels, norm, dilation=int(d), separable=separable) for d in dilations)
        self.out_channels = branch_channels * len(self.branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


def up_conv2x2(in_ch: int, out_ch: int, separable: bool = False) -> nn.Module:
    """2x2 stride-2 transposed convolution ("up-convolution"), dense or separable.

    The separable form is a pointwise 1x1 convolution at the *low* resolution followed by a
    depthwise 2x2 transposed convolution (``groups=out_ch``): ``in*out + 4*out`` weights and a
    quarter of the dense form's multiply-adds (the dense one costs ``in*out`` per *output* pixel).
    """
    if not separable:
        return nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False),
                         nn.ConvTranspose2d(out_ch, out_ch, 2, stride=2, groups=out_ch))


def apply_film(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel affine modulation ``x * gamma + beta`` (FiLM, Perez et al. 2018).

    Args:
        x: features ``[B, C, H, W]``.
        gamma, beta: ``[B, C]``.
    """
    if gamma.shape != x.shape[:2] or beta.shape != x.shape[:2]:
        raise ValueError(f"FiLM parameters of shape {tuple(gamma.shape)}/{tuple(beta.shape)} do not match "
                         f"features of shape {tuple(x.shape)} (expected [B, C] = {tuple(x.shape[:2])})")
    return x * gamma[:, :, None, None] + beta[:, :, None, None]


class RUSPNet(nn.Module):
    """RUSP-Net for 2D slices: ``[B, in_channels, H, W] -> logits [B, n_classes, H, W]``.

    Args:
        in_channels: input channels (1 for a CT slice).
        n_classes: output classes (3: background, kidney, tumour; 4 with cyst for KiTS21/23).
        base_channels: channels of the first level; level ``i`` has ``base_channels * 2**i``.
        depth: number of poolings; inputs are padded to a multiple of ``2**depth``.
        separable: depthwise-separable 3x3 convolutions everywhere (the lightweight variant).
        norm: ``"batch"`` (plain :class:`torch.nn.BatchNorm2d`), ``"instance"``, ``"group"`` or ``"none"``.
        spp_dilations: dilations of the SPP branches at the bottleneck.
        spp_branch_channels: width of each SPP branch (default: a quarter of the deepest level's width,
            so the concatenated SPP output has 3/4 of it).
        decoder_dilation: dilation of the 3x3 convolutions in the final decoder level(s).
        dilated_levels: how many of the final (highest-resolution) decoder levels are dilated.
        channels_last: store weights and run in ``torch.channels_last`` memory format.

    Example::

        net = RUSPNet(n_classes=3, base_channels=16, depth=4, separable=True)
        logits = net(torch.randn(2, 1, 37, 53))   # [2, 3, 37, 53]
    """

    #: image only: ``forward(image)`` (callers ask this attribute, not the model name)
    takes_clinical = False

    def __init__(self, in_channels: int = 1, n_classes: int = 3, base_channels: int = 32, depth: int = 4,
                 separable: bool = False, norm: str | None = "batch", spp_dilations: Sequence[int] = (1, 2, 3),
                 spp_branch_channels: int | None = None, decoder_dilation: int = 2, dilated_levels: int = 1,
                 channels_last: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"RUSPNet depth must be >= 1, got {depth}")
        if base_channels < 1 or n_classes < 1 or in_channels < 1:
            raise ValueError(f"RUSPNet needs positive sizes, got in_channels={in_channels}, "
                             f"n_classes={n_classes}, base_channels={base_channels}")
        self.depth = depth
        self.channels = [base_channels * 2 ** i for i in range(depth + 1)]
        self.channels_last = channels_last
        ch = self.channels

        self.encoders = nn.ModuleList()
        c = in_channels
        for i in range(depth):
            self.encoders.append(_Block(c, ch[i], norm, separable=separable))
            c = ch[i]
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _Block(ch[depth - 1], ch[depth], norm, separable=separable)
        self.spp = SpatialPyramidPooling(ch[depth], spp_branch_channels or max(ch[depth] // 4, 1),
                                         spp_dilations, norm, separable)
        # Decoder, from the deepest level (depth-1) up to level 0 (full resolution).
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        c = self.spp.out_channels
        for i in reversed(range(depth)):
            dil = decoder_dilation if i < dilated_levels else 1
            self.ups.append(up_conv2x2(c, ch[i], separable))
            self.decoders.append(_Block(2 * ch[i], ch[i], norm, dilation=dil, separable=separable))
            c = ch[i]
        has_norm = norm not in (None, "none")
        self.spp_proj = nn.Sequential(nn.Conv2d(self.spp.out_channels, ch[0], 1, bias=not has_norm),
                                      make_norm(norm, ch[0]), nn.ReLU(inplace=True))
        # Y = conv(relu(conv(concat(R_0, SPP upsampled))))
        self.head = nn.Sequential(conv3x3(2 * ch[0], ch[0], dilation=1, separable=separable, bias=True),
                                  nn.ReLU(inplace=True), nn.Conv2d(ch[0], n_classes, 1))
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def bottleneck_channels(self) -> int:
        """Channels of the bottleneck output (the concatenated SPP branches)."""
        return self.spp.out_channels

    @property
    def decoder_channels(self) -> int:
        """Channels of ``R_0``, the last decoder features."""
        return self.channels[0]

    def forward(self, x: torch.Tensor, conditioning: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                return_features: bool = False):
        """Segment a batch of slices.

        Args:
            x: ``[B, in_channels, H, W]``, any ``H, W``.
            conditioning: optional FiLM parameters ``{"bottleneck": (gamma, beta), "decoder": (gamma, beta)}``,
                each ``[B, C]``, applied to the SPP output and to ``R_0`` respectively.
            return_features: also return ``{"bottleneck": [B, C_d, h, w], "decoder": [B, C_0, H, W]}``
                (after conditioning) for pooled late fusion.

        Returns:
            logits ``[B, n_classes, H, W]``, or ``(logits, features)`` when ``return_features``.
        """
        if x.dim() != 4:
            raise ValueError(f"RUSPNet expects [B, C, H, W] input, got shape {tuple(x.shape)}")
        conditioning = dict(conditioning or {})
        unknown = set(conditioning) - {"bottleneck", "decoder"}
        if unknown:
            raise ValueError(f"unknown conditioning target(s) {sorted(unknown)}; use 'bottleneck' and/or 'decoder'")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, (h, w) = pad_to_multiple(x, 2 ** self.depth)
        full = x.shape[-2:]

        skips = []  # H_i
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.spp(self.bottleneck(x))
        if "bottleneck" in conditioning:
            x = apply_film(x, *conditioning["bottleneck"])
        bottleneck = x

        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            g = dec(torch.cat([up(x), skip], dim=1))  # G_i
            x = skip + g  # R_i = H_i + G_i
        if "decoder" in conditioning:
            x = apply_film(x, *conditioning["decoder"])

        spp_up = F.interpolate(self.spp_proj(bottleneck), size=full, mode="bilinear", align_corners=False)
        logits = self.head(torch.cat([x, spp_up], dim=1))[..., :h, :w]
        if return_features:
            return logits, {"bottleneck": bottleneck, "decoder": x[..., :h, :w]}
        return logits
