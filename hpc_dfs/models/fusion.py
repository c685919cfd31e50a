"""DFS fusion model: RUSP-Net segmentation of CT slices fused with a clinical embedding.

``f(X_img) + g(X_clinical)`` -> per-pixel class logits and a case-level risk logit (e.g. malignancy
of a KiTS case). The ``fusion`` switch selects the ablation:

========== ======================================= =============================================
fusion     segmentation logits                      risk logit
========== ======================================= =============================================
image      RUSP-Net(image)                          MLP(pooled image features); clinical ignored
clinical   RUSP-Net(image)                          MLP(clinical embedding)
late       RUSP-Net(image)                          MLP([pooled image features, clinical embedding])
film       RUSP-Net(image) with FiLM conditioning   MLP([pooled image features, clinical embedding])
========== ======================================= =============================================

FiLM (Perez et al., 2018; the tabular-image form is DAFT, Wolf et al., 2022) scales and shifts,
per sample and per channel, the RUSP-Net bottleneck (after SPP) and the last decoder features
``R_0`` by ``gamma = 1 + W_g e``, ``beta = W_b e`` of the clinical embedding ``e``. ``W_g, W_b``
start at zero, so at initialisation the network is exactly the image-only one and training learns
how much the clinical record should modulate the segmentation.

"Pooled image features" are the global average of the bottleneck and of ``R_0``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .clinical_gru import ClinicalEncoder
from .dropout import SampleDropout
from .rusp_net import RUSPNet

__all__ = ["DFSFusion", "FiLM", "FUSIONS"]

FUSIONS = ("film", "late", "image", "clinical")


class FiLM(nn.Module):
    """Maps an embedding ``[B, E]`` to per-channel ``(gamma, beta)`` ``[B, C]``, initialised to identity."""

    def __init__(self, embed_dim: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_gamma, beta = self.linear(embedding).chunk(2, dim=1)
        return 1.0 + d_gamma, beta


class DFSFusion(nn.Module):
    """Distributed Fusion Segmentation model.

    Args:
        in_channels: image channels (1 for CT).
        n_classes: segmentation classes (background, kidney, tumour[, cyst]).
        n_clinical: number of clinical features ``F`` (the manifest's ``clinical.n_features``);
            required (> 0) unless ``fusion="image"``.
        base_channels, depth, separable, norm, spp_dilations, decoder_dilation, channels_last:
            passed to :class:`~hpc_dfs.models.rusp_net.RUSPNet`.
        fusion: ``"film"``, ``"late"``, ``"image"`` or ``"clinical"`` (see the module docstring).
        clinical_hidden: GRU hidden size of the clinical encoder.
        embed_dim: clinical embedding size.
        risk_hidden: hidden width of the risk MLP.
        dropout: dropout in the clinical encoder and the risk MLP.

    ``forward(image [B, in_channels, H, W], clinical [B, F] or None)`` returns
    ``{"seg_logits": [B, n_classes, H, W], "risk_logit": [B]}``.
    """

    #: ``forward(image, clinical)`` (``clinical`` may be ``None`` for the image-only ablation)
    takes_clinical = True

    def __init__(self, in_channels: int = 1, n_classes: int = 3, n_clinical: int = 0, base_channels: int = 32,
                 depth: int = 4, separable: bool = True, fusion: str = "film", norm: str = "batch",
                 clinical_hidden: int = 32, embed_dim: int = 32, risk_hidden: int = 32, dropout: float = 0.2,
                 spp_dilations: Sequence[int] = (1, 2, 3), decoder_dilation: int = 2,
                 channels_last: bool = False) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion '{fusion}' (choose one of {', '.join(FUSIONS)})")
        uses_clinical = fusion != "image"
        if uses_clinical and n_clinical < 1:
            raise ValueError(f"fusion '{fusion}' needs clinical features but n_clinical={n_clinical}; set it to "
                             "the manifest's clinical.n_features, or use fusion='image'")
        self.fusion = fusion
        self.n_clinical = n_clinical
        self.backbone = RUSPNet(in_channels, n_classes, base_channels, depth, separable=separable, norm=norm,
                                spp_dilations=spp_dilations, decoder_dilation=decoder_dilation,
                                channels_last=channels_last)
        self.clinical_encoder = (ClinicalEncoder(n_clinical, clinical_hidden, embed_dim, dropout)
                                 if uses_clinical else None)
        if fusion == "film":
            self.film_bottleneck = FiLM(embed_dim, self.backbone.bottleneck_channels)
            self.film_decoder = FiLM(embed_dim, self.backbone.decoder_channels)
        risk_in = 0
        if fusion in ("image", "late", "film"):
            risk_in += self.backbone.bottleneck_channels + self.backbone.decoder_channels
        if fusion in ("clinical", "late", "film"):
            risk_in += embed_dim
        self.risk_head = nn.Sequential(nn.Linear(risk_in, risk_hidden), nn.ReLU(inplace=True), SampleDropout(dropout),
                                       nn.Linear(risk_hidden, 1))

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        embedding = None
        if self.clinical_encoder is not None:
            if clinical is None:
                raise ValueError(f"DFSFusion(fusion='{self.fusion}') needs the clinical features [B, "
                                 f"{self.n_clinical}] but got None")
            if clinical.shape[0] != image.shape[0]:
                raise ValueError(f"clinical batch size {clinical.shape[0]} != image batch size {image.shape[0]}")
            embedding = self.clinical_encoder(clinical)

        conditioning = None
        if self.fusion == "film":
            conditioning = {"bottleneck": self.film_bottleneck(embedding), "decoder": self.film_decoder(embedding)}
        seg_logits, feats = self.backbone(image, conditioning=conditioning, return_features=True)

        parts = []
        if self.fusion in ("image", "late", "film"):
            parts += [feats["bottleneck"].mean(dim=(2, 3)), feats["decoder"].mean(dim=(2, 3))]
        if self.fusion in ("clinical", "late", "film"):
            parts.append(embedding)
        risk_logit = self.risk_head(torch.cat(parts, dim=1)).squeeze(-1)
        return {"seg_logits": seg_logits, "risk_logit": risk_logit}
