"""Model settings (:class:`ModelConfig`): the keyword arguments of ``hpc_dfs.models.build_model``.

The fields are exactly ``build_model``'s parameters (checked in ``tests/unit/models/test_models.py``), so
a trainer builds the network with ``build_model(**to_dict(cfg.model))`` and a checkpoint's
``model_config`` (the same dict) rebuilds it for prediction. Set them in the ``[model]`` table of a
TOML config or with ``--set model.KEY=VALUE`` (e.g. ``--set model.fusion=late``).

``n_clinical`` must equal the number of transformed clinical features; the trainer takes it from
the manifest (``clinical.n_features``) when it is left at 0.

The model names are listed once, in ``hpc_dfs.models.MODELS``: :meth:`ModelConfig.validate` reads them from
there (imported when a config is validated, so that importing this module stays free of torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from hpc_dfs.config import ConfigError

__all__ = ["ModelConfig"]


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class ModelConfig:
    """Which network to build and its shape (see ``hpc_dfs.models.build_model``)."""

    name: str = field(default="dfs_fusion", metadata=_h(
        "network, a name of hpc_dfs.models.MODELS (`hpc-dfs models` lists them); dfs_fusion = RUSP-Net + clinical"))
    in_channels: int = field(default=1, metadata=_h("image channels"))
    n_classes: int = field(default=3, metadata=_h("segmentation classes (background, kidney, tumour[, cyst])"))
    n_clinical: int = field(default=0, metadata=_h(
        "clinical features F; 0 = take the manifest's clinical.n_features"))
    base_channels: Optional[int] = field(default=None, metadata=_h(
        "first-level width; default 32 (RUSP-Net, DFS) or 64 (U-Net)"))
    depth: int = field(default=4, metadata=_h("number of poolings (inputs are padded to a multiple of 2**depth)"))
    separable: Optional[bool] = field(default=None, metadata=_h(
        "depthwise-separable convolutions; default by name (dfs_fusion: true)"))
    fusion: Literal["film", "late", "image", "clinical"] = field(default="film", metadata=_h(
        "dfs_fusion ablation: film (FiLM + late), late, image (image only), clinical (risk from clinical only)"))
    norm: Optional[Literal["batch", "instance", "group", "none"]] = field(default=None, metadata=_h(
        "normalisation; default batch (U-Net: none, as in Ronneberger et al.)"))
    clinical_hidden: int = field(default=32, metadata=_h("GRU hidden size of the clinical encoder"))
    embed_dim: int = field(default=32, metadata=_h("clinical embedding size used for fusion"))
    risk_hidden: int = field(default=32, metadata=_h("hidden width of the risk MLP"))
    dropout: float = field(default=0.2, metadata=_h("dropout of the clinical encoder and risk MLP"))
    spp_dilations: list[int] = field(default_factory=lambda: [1, 2, 3], metadata=_h(
        "dilations of the spatial-pyramid branches at the bottleneck"))
    decoder_dilation: int = field(default=2, metadata=_h("dilation of the final decoder level's convolutions"))
    channels_last: bool = field(default=False, metadata=_h("channels-last memory format (faster with AMP on GPUs)"))

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        from hpc_dfs.models import MODEL_NAMES, SEGMENTATION_MODELS
        if self.name not in MODEL_NAMES:
            raise ConfigError(f"model.name must be one of {', '.join(MODEL_NAMES)}, got {self.name!r}")
        for key in ("in_channels", "n_classes", "depth", "clinical_hidden", "embed_dim", "risk_hidden",
                    "decoder_dilation"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.n_clinical < 0:
            raise ConfigError(f"model.n_clinical must be >= 0, got {self.n_clinical}")
        if self.base_channels is not None and self.base_channels < 1:
            raise ConfigError(f"model.base_channels must be >= 1, got {self.base_channels}")
        if self.name in SEGMENTATION_MODELS and self.name != "unet" and self.n_classes < 2:
            raise ConfigError(f"model.n_classes must be >= 2 for {self.name} (softmax segmentation)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.spp_dilations or any(d < 1 for d in self.spp_dilations):
            raise ConfigError(
                f"model.spp_dilations must be a non-empty list of dilations >= 1, got {self.spp_dilations}")
        if self.name == "rusp_net" and self.separable is True:
            raise ConfigError("model.separable=true contradicts model.name='rusp_net'; use name 'rusp_net_dw'")
        if self.name == "rusp_net_dw" and self.separable is False:
            raise ConfigError("model.separable=false contradicts model.name='rusp_net_dw'; use name 'rusp_net'")
