"""Models of hpc-dfs: RUSP-Net, the classical U-Net, Clinical-GRU, the DFS fusion model and its loss.

This package imports only torch, MONAI and numpy: a model knows nothing of ranks, files or configs.
Build any model by name with :func:`build_model`; its keyword arguments are exactly the fields of
``hpc_dfs.config.model.ModelConfig``, so a trainer does ``build_model(**to_dict(cfg.model))`` and a
checkpoint's ``model_config`` rebuilds the same network.

:data:`MODELS` is the one list of model names (``hpc_dfs.config.model`` checks ``model.name`` against it,
``hpc-dfs models`` summarises each). Whether a model reads the clinical features is its class attribute
``takes_clinical``: callers ask the model, never its name.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from .clinical_gru import ClinicalEncoder, ClinicalGRU
from .fusion import FUSIONS, DFSFusion, FiLM
from .losses import DFSLoss
from .pruning import make_permanent, prune_model, sparsity_report
from .rusp_net import RUSPNet
from .summary import count_flops, count_parameters, model_summary
from .unet import NORMS, UNet

__all__ = ["build_model", "MODELS", "MODEL_NAMES", "SEGMENTATION_MODELS", "UNet", "RUSPNet", "ClinicalGRU",
           "ClinicalEncoder", "DFSFusion", "FiLM", "DFSLoss", "FUSIONS", "NORMS", "count_parameters", "count_flops",
           "model_summary", "prune_model", "sparsity_report", "make_permanent"]

#: every model name and its class; ``rusp_net_dw`` is the depthwise-separable RUSP-Net
MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "rusp_net": RUSPNet, "rusp_net_dw": RUSPNet,
                                      "clinical_gru": ClinicalGRU, "dfs_fusion": DFSFusion}
MODEL_NAMES = tuple(MODELS)
#: the models that segment an image (``hpc-dfs train``); the Clinical-GRU is trained by ``hpc-dfs clinical``
SEGMENTATION_MODELS = tuple(name for name, cls in MODELS.items() if cls is not ClinicalGRU)


def build_model(name: str = "dfs_fusion", in_channels: int = 1, n_classes: int = 3, n_clinical: int = 0,
                base_channels: int | None = None, depth: int = 4, separable: bool | None = None,
                fusion: str = "film", norm: str | None = None, clinical_hidden: int = 32, embed_dim: int = 32,
                risk_hidden: int = 32, dropout: float = 0.2, spp_dilations: Sequence[int] = (1, 2, 3),
                decoder_dilation: int = 2, channels_last: bool = False) -> nn.Module:
    """Build a model by name; arguments a model does not use are ignored.

    Args:
        name: a key of :data:`MODELS`.
        in_channels: image channels.
        n_classes: segmentation classes (the U-Net's output channels).
        n_clinical: clinical features ``F`` (Clinical-GRU; DFS fusion unless ``fusion="image"``).
        base_channels: first-level width; ``None`` = the model's default (U-Net 64, RUSP-Net 32).
        depth: number of poolings.
        separable: depthwise-separable convolutions; ``None`` = the name's default (``rusp_net``:
            False, ``rusp_net_dw`` and ``dfs_fusion``: True). Contradicting the name is an error.
        fusion: DFS fusion mode, one of ``film``, ``late``, ``image``, ``clinical``.
        norm: ``batch``, ``instance``, ``group`` or ``none``; ``None`` = the model's default
            (U-Net: none, as in Ronneberger et al.; RUSP-Net and DFS: batch).
        clinical_hidden: GRU hidden size (Clinical-GRU and the DFS clinical encoder).
        embed_dim: DFS clinical embedding size.
        risk_hidden: DFS risk-MLP width.
        dropout: dropout of the clinical models and the risk MLP.
        spp_dilations: RUSP-Net SPP dilations.
        decoder_dilation: dilation of RUSP-Net's final decoder level.
        channels_last: RUSP-Net/DFS weights and activations in channels-last memory format.

    Raises:
        ValueError: an unknown name, or ``separable`` contradicting it.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (choose one of {', '.join(MODEL_NAMES)})")
    cls = MODELS[name]
    if cls is UNet:
        return UNet(in_channels, n_classes, base_channels or 64, depth, norm or "none")
    if cls is ClinicalGRU:
        return ClinicalGRU(n_clinical, hidden=clinical_hidden, dropout=dropout)
    if name == "rusp_net_dw" and separable is False:
        raise ValueError("model 'rusp_net_dw' is the depthwise-separable RUSP-Net; separable=False contradicts it "
                         "(use name 'rusp_net')")
    if name == "rusp_net" and separable is True:
        raise ValueError("model 'rusp_net' has dense convolutions; for separable ones use name 'rusp_net_dw'")
    if cls is RUSPNet:
        return RUSPNet(in_channels, n_classes, base_channels or 32, depth, separable=(name == "rusp_net_dw"),
                       norm=norm or "batch", spp_dilations=tuple(spp_dilations), decoder_dilation=decoder_dilation,
                       channels_last=channels_last)
    return DFSFusion(in_channels, n_classes, n_clinical, base_channels or 32, depth,
                     separable=True if separable is None else separable, fusion=fusion, norm=norm or "batch",
                     clinical_hidden=clinical_hidden, embed_dim=embed_dim, risk_hidden=risk_hidden, dropout=dropout,
                     spp_dilations=tuple(spp_dilations), decoder_dilation=decoder_dilation, channels_last=channels_last)
