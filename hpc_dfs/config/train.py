"""Settings of ``hpc-dfs train`` (:class:`TrainConfig`) and its augmentation (:class:`AugmentConfig`).

Defaults suit a GPU cluster; tests and demos pass small sizes explicitly. The settings are grouped in
sections -- ``schedule``, ``data``, ``optim``, ``loss``, ``horovod``, ``checkpoint``, ``model``,
``augmentation`` -- plus a few top-level ones (seed, determinism, precision, threads, logging). Every
field can be set in a TOML file (``--config FILE``, one ``[section]`` table each), with
``--set section.key=value`` (``--set optim.lr=1e-3``, ``--set model.base_channels=8``) or, for the
fields of the first six sections and the top-level ones, with a ``--flag`` named after the field alone
(``--epochs 2 --global-batch-size 32 --lr 1e-3``; ``hpc-dfs train --help`` lists them by section). A
flat key of the old layout (``lr = 0.01`` at the top of a TOML file) is refused with a message naming
its new key (``optim.lr``).

Batch and learning-rate semantics (Horovod's recipe, made explicit):

- ``data.batch_size`` is the per-rank batch of Horovod's usual weak scaling, and ``lr`` is the learning
  rate for a batch of that size. With ``global_batch_size = 0`` the global batch is
  ``batch_size x ranks``.
- ``global_batch_size > 0`` fixes the global batch whatever the number of ranks; it is split evenly
  over ranks (and over ``backward_passes_per_step`` micro-batches), so it must be divisible.
- ``lr_scaling = "linear"`` multiplies ``lr`` by ``global batch / batch_size``: in weak scaling that is
  exactly the world size (x ``backward_passes_per_step``, as in Horovod's ImageNet example; Goyal et
  al. 2017), and with a fixed global batch it does not depend on the number of ranks.
  ``warmup_epochs`` ramps linearly from the unscaled to the scaled rate. Adasum is scale-free, so
  Adasum runs use no LR scaling.

Why Adam is the default: on phantom shards (64x64, DFS fusion at base width 8, batch 16 with a third
tumour slices) Adam at 3e-3 reached validation kidney Dice 0.76 and tumour 0.16 after 100 steps, while
SGD (Nesterov, momentum 0.9, lr 0.01) was still at 0 after 200 and momentum 0.99 at lr 0.02 collapsed
to all-background. SGD suits long nnU-Net-style schedules; pass ``--optimizer sgd`` for the DFS
paper's setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from hpc_dfs.config import ConfigError, from_dict, nest_flat
from hpc_dfs.config.model import ModelConfig

__all__ = ["TrainConfig", "AugmentConfig", "ScheduleConfig", "DataConfig", "OptimConfig", "LossConfig",
           "HorovodConfig", "CheckpointConfig"]


#: the largest learning rate accepted (SGD on normalised CT rarely goes above 0.1; 1e12 is a typo, not a setting)
MAX_LR = 10.0


def _range(name: str, v: list[float], lo: float | None = None, hi: float | None = None) -> None:
    if len(v) != 2 or v[0] > v[1]:
        raise ConfigError(f"{name} must be two numbers [low, high] with low <= high, got {v}")
    if lo is not None and v[0] < lo or hi is not None and v[1] > hi:
        raise ConfigError(f"{name} must lie within [{lo}, {hi}], got {v}")


@dataclass
class AugmentConfig:
    """Training augmentation (:mod:`hpc_dfs.data.augment`): probabilities per sample and ranges.

    Intensity ranges are relative to each slice's own statistics (std, min-max span), so they hold for
    both preprocessing schemes.
    """

    flip_lr: float = field(default=0.5, metadata={"help": "probability of a left-right flip"})
    flip_ap: float = field(default=0.0, metadata={"help": "probability of an anterior-posterior flip"})
    affine_prob: float = field(default=0.5, metadata={"help": "probability of rotation + scaling"})
    rotate_deg: float = field(default=15.0, metadata={"help": "rotation drawn from [-deg, deg]"})
    scale: list[float] = field(default_factory=lambda: [0.85, 1.15], metadata={"help": "zoom range"})
    translate: Optional[float] = field(default=None, metadata={
        "help": "with the rotation: a move of up to +-this fraction of the slice (stage 2's window jitter); "
                "unset = 0.1 for stage refine, 0 for stage locate"})
    elastic_prob: float = field(default=0.0, metadata={"help": "probability of a smooth elastic deformation"})
    elastic_pixels: float = field(default=3.0, metadata={"help": "elastic displacement std in pixels"})
    elastic_grid: int = field(default=4, metadata={"help": "control points per side of the elastic field"})
    bias_prob: float = field(default=0.3, metadata={"help": "probability of a smooth multiplicative bias field"})
    bias_strength: float = field(default=0.3, metadata={"help": "max log-amplitude of the bias field"})
    gamma_prob: float = field(default=0.3, metadata={"help": "probability of a random gamma"})
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5], metadata={"help": "gamma range"})
    contrast_prob: float = field(default=0.5, metadata={"help": "probability of contrast/brightness change"})
    contrast: list[float] = field(default_factory=lambda: [0.75, 1.25], metadata={"help": "contrast factor range"})
    brightness: float = field(default=0.2, metadata={"help": "brightness shift in slice std units, +-"})
    window_prob: float = field(default=0.3, metadata={"help": "probability of clipping to a narrower window"})
    window_clip: float = field(default=0.15, metadata={"help": "max fraction of the range clipped at each end"})
    blur_prob: float = field(default=0.3, metadata={"help": "probability of blur or sharpening"})
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.5], metadata={"help": "Gaussian sigma, px"})
    sharpen_amount: list[float] = field(default_factory=lambda: [-1.0, 1.5], metadata={
        "help": "unsharp amount: -1 = full blur, 0 = none, > 0 sharpen"})
    lowres_prob: float = field(default=0.25, metadata={"help": "probability of simulated low resolution"})
    lowres_factor: list[float] = field(default_factory=lambda: [1.0, 2.0], metadata={"help": "downsampling range"})
    noise_prob: float = field(default=0.3, metadata={"help": "probability of white Gaussian noise"})
    noise_std: list[float] = field(default_factory=lambda: [0.0, 0.15], metadata={"help": "noise std, slice std units"})
    texture_prob: float = field(default=0.3, metadata={"help": "probability of correlated (textured) noise"})
    texture_std: list[float] = field(default_factory=lambda: [0.0, 0.15], metadata={
        "help": "texture std, slice std units"})
    texture_sigma: list[float] = field(default_factory=lambda: [1.0, 3.0], metadata={"help": "texture grain, px"})
    domain_random_prob: float = field(default=0.0, metadata={
        "help": "probability of domain randomisation (SynthSeg style, before the ops above): a random intensity "
                "curve, then random shifts and textures of each label region (kidney, tumour)"})
    remap_points: int = field(default=6, metadata={"help": "control points of the random intensity curve"})
    remap_monotone: float = field(default=0.5, metadata={
        "help": "probability that the random curve is monotone (otherwise tissue contrasts may reorder)"})
    region_shift: float = field(default=1.5, metadata={
        "help": "largest shift of a label region's intensity, slice std units, +-"})
    region_texture: list[float] = field(default_factory=lambda: [0.0, 0.3], metadata={
        "help": "textured noise std inside each label region, slice std units"})
    region_edge: float = field(default=1.0, metadata={
        "help": "smoothing (px) of the label regions, so a shift leaves no step exactly on the label boundary"})

    def validate(self) -> None:
        if self.translate is not None and not 0.0 <= self.translate <= 0.5:
            raise ConfigError(f"augmentation.translate must be in [0, 0.5], got {self.translate}")
        for name in ("flip_lr", "flip_ap", "affine_prob", "elastic_prob", "bias_prob", "gamma_prob", "contrast_prob",
                     "window_prob", "blur_prob", "lowres_prob", "noise_prob", "texture_prob", "domain_random_prob",
                     "remap_monotone"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"augmentation.{name} is a probability, got {p}")
        _range("augmentation.scale", self.scale, 0.1, 10.0)
        _range("augmentation.gamma", self.gamma, 0.01, 100.0)
        _range("augmentation.contrast", self.contrast, 0.0)
        _range("augmentation.blur_sigma", self.blur_sigma, 0.0, 10.0)
        _range("augmentation.sharpen_amount", self.sharpen_amount, -1.0, 10.0)
        _range("augmentation.lowres_factor", self.lowres_factor, 1.0, 8.0)
        _range("augmentation.noise_std", self.noise_std, 0.0)
        _range("augmentation.texture_std", self.texture_std, 0.0)
        _range("augmentation.texture_sigma", self.texture_sigma, 0.1, 10.0)
        if not 0.0 <= self.window_clip < 0.5:
            raise ConfigError(f"augmentation.window_clip must be in [0, 0.5), got {self.window_clip}")
        if self.elastic_grid < 2:
            raise ConfigError(f"augmentation.elastic_grid must be >= 2, got {self.elastic_grid}")
        if not 2 <= self.remap_points <= 64:
            raise ConfigError(f"augmentation.remap_points must be in [2, 64], got {self.remap_points}")
        if self.region_shift < 0:
            raise ConfigError(f"augmentation.region_shift must be >= 0, got {self.region_shift}")
        _range("augmentation.region_texture", self.region_texture, 0.0)
        if not 0.0 <= self.region_edge <= 10.0:
            raise ConfigError(f"augmentation.region_edge must be in [0, 10] px, got {self.region_edge}")


def _h(text: str) -> dict:
    return {"help": text}


def _section(cls: type, text: str, flags: bool = True):
    """A nested section; ``flags`` gives each of its scalar fields a ``--flag`` of its own name."""
    return field(default_factory=cls, metadata={"help": text, "flags": flags})


def _at_least(section: str, obj, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(obj, name) < low:
            key = f"{section}.{name}" if section else name
            raise ConfigError(f"{key} must be >= {low}, got {getattr(obj, name)}")


@dataclass
class ScheduleConfig:
    """How long to train and how often to validate."""

    epochs: int = field(default=100, metadata=_h("training epochs"))
    steps_per_epoch: int = field(default=0, metadata=_h(
        "optimizer steps per epoch; 0 = one pass over the training slices"))
    max_steps: int = field(default=0, metadata=_h("stop after this many optimizer steps in all; 0 = no limit"))
    val_every: int = field(default=1, metadata=_h("validate every N epochs (and after the last)"))
    val_fold: int = field(default=0, metadata=_h("manifest fold held out for validation"))

    def validate(self) -> None:
        _at_least("schedule", self, ("epochs", "val_every"), 1)
        _at_least("schedule", self, ("steps_per_epoch", "max_steps", "val_fold"), 0)


@dataclass
class DataConfig:
    """Batches, sampling, loading and augmentation on/off."""

    batch_size: int = field(default=16, metadata=_h(
        "per-rank batch (Horovod weak scaling) and the batch `lr` is given for"))
    global_batch_size: int = field(default=0, metadata=_h(
        "fixed global batch split over ranks (must divide by ranks x backward_passes_per_step); "
        "0 = batch_size x ranks"))
    fg_fraction: float = field(default=0.33, metadata=_h(
        "share of each global batch drawn from slices that contain tumour (else kidney)"))
    val_batch_size: int = field(default=32, metadata=_h("slices per validation forward pass"))
    num_workers: int = field(default=2, metadata=_h("DataLoader worker processes per rank"))
    augment: bool = field(default=True, metadata=_h("training augmentation (see augmentation.*)"))
    context: int = field(default=0, metadata=_h(
        "2.5D: neighbouring slices per input (odd), as channels; 0 = 1 for stage locate, 3 for stage refine"))
    shuffle_clinical: bool = field(default=False, metadata=_h(
        "a control for the fusion ablation: each training case gets another case's clinical record (a fixed "
        "permutation from the seed), so the record carries no information about its image"))

    def validate(self) -> None:
        _at_least("data", self, ("batch_size", "val_batch_size"), 1)
        _at_least("data", self, ("global_batch_size", "num_workers", "context"), 0)
        if self.context and self.context % 2 == 0:
            raise ConfigError(f"data.context must be odd (the slice and k//2 neighbours each side), got {self.context}")
        if not 0.0 <= self.fg_fraction <= 1.0:
            raise ConfigError(f"data.fg_fraction must be in [0, 1], got {self.fg_fraction}")


@dataclass
class OptimConfig:
    """Optimizer, learning rate, its schedule, warm-up and clipping."""

    optimizer: Literal["sgd", "adam"] = field(default="adam", metadata=_h(
        "adam: Adam + ReduceLROnPlateau (the paper's RUSP-Net recipe; learns kidney fastest); "
        "sgd: SGD + Nesterov momentum with a poly schedule (the DFS paper's optimizer)"))
    lr: Optional[float] = field(default=None, metadata=_h(
        "learning rate for a batch of batch_size; default 0.01 (sgd) or 1e-3 (adam)"))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    nesterov: bool = field(default=True, metadata=_h("Nesterov momentum for SGD"))
    weight_decay: float = field(default=3e-5, metadata=_h("L2 weight decay"))
    scheduler: Literal["auto", "poly", "cosine", "plateau", "none"] = field(default="auto", metadata=_h(
        "per-epoch LR schedule; auto = poly (sgd) or plateau on val loss (adam)"))
    plateau_factor: float = field(default=0.1, metadata=_h("ReduceLROnPlateau factor"))
    plateau_patience: int = field(default=10, metadata=_h("ReduceLROnPlateau patience (epochs)"))
    lr_scaling: Literal["linear", "sqrt", "none"] = field(default="linear", metadata=_h(
        "scale lr by (global batch / batch_size): = world size in weak scaling"))
    warmup_epochs: float = field(default=2.0, metadata=_h("linear LR warm-up from lr to the scaled lr"))
    grad_clip: float = field(default=12.0, metadata=_h("clip the global gradient norm; 0 = off"))

    def validate(self) -> None:
        if self.lr is not None and not 0 < self.lr <= MAX_LR:
            raise ConfigError(f"optim.lr must be in (0, {MAX_LR:g}], got {self.lr:g} (a larger rate only diverges)")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ConfigError(f"optim.plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_epochs, optim.weight_decay and optim.grad_clip must be >= 0")

    @property
    def base_lr(self) -> float:
        """``lr`` or the optimizer's default."""
        return self.lr if self.lr is not None else (0.01 if self.optimizer == "sgd" else 1e-3)

    @property
    def lr_schedule(self) -> str:
        """The LR schedule after resolving ``auto``."""
        if self.scheduler != "auto":
            return self.scheduler
        return "poly" if self.optimizer == "sgd" else "plateau"


@dataclass
class LossConfig:
    """Weights of the DFS loss terms (:class:`hpc_dfs.models.DFSLoss`)."""

    dice_weight: float = field(default=1.0, metadata=_h("weight of the batch Dice term"))
    ce_weight: float = field(default=1.0, metadata=_h("weight of the cross-entropy term"))
    risk_weight: float = field(default=0.1, metadata=_h("weight of the risk BCE term"))
    regions: Literal["none", "kits23"] = field(default="none", metadata=_h(
        "'none': one softmax over the classes; 'kits23': nnU-Net's KiTS23 regions, one sigmoid each for "
        "kidney+masses, masses and tumour, trained with BCE + soft Dice (needs the cyst class)"))

    def validate(self) -> None:
        if min(self.dice_weight, self.ce_weight, self.risk_weight) < 0:
            raise ConfigError("loss.dice_weight, loss.ce_weight and loss.risk_weight must be >= 0")


@dataclass
class HorovodConfig:
    """Gradient reduction, accumulation, BatchNorm synchronisation and Horovod's tools."""

    compression: Literal["none", "fp16"] = field(default="none", metadata=_h("gradient compression on the wire"))
    adasum: bool = field(default=False, metadata=_h("Adasum gradient reduction instead of averaging"))
    backward_passes_per_step: int = field(default=1, metadata=_h(
        "gradient accumulation: local backward passes per allreduce + optimizer step"))
    sync_bn: bool = field(default=True, metadata=_h(
        "synchronise BatchNorm statistics across ranks (global-batch statistics)"))
    timeline: Optional[str] = field(default=None, metadata=_h("write a Horovod Timeline (JSON) to this path"))
    autotune: bool = field(default=False, metadata=_h("Horovod autotuning of fusion buffer and cycle time"))
    autotune_log: Optional[str] = field(default=None, metadata=_h("CSV log of the autotuner"))
    stall_timeout: int = field(default=60, metadata=_h(
        "seconds after which a stalled collective (a dead or hung rank) shuts the job down"))

    def validate(self) -> None:
        _at_least("horovod", self, ("backward_passes_per_step",), 1)
        if self.stall_timeout < 5:
            raise ConfigError(f"horovod.stall_timeout must be >= 5 seconds, got {self.stall_timeout}")


@dataclass
class CheckpointConfig:
    """What is kept in ``RUN/checkpoints`` besides ``last.pt`` and ``best.pt``."""

    keep_last: int = field(default=3, metadata=_h("keep the last K epoch checkpoints besides last/best"))

    def validate(self) -> None:
        _at_least("checkpoint", self, ("keep_last",), 0)


@dataclass
class TrainConfig:
    """``hpc-dfs train``: the DFS fusion model, trained data-parallel with Horovod."""

    stage: Literal["locate", "refine", "both"] = field(default="locate", metadata=_h(
        "cascade stage: 'locate' (whole slices, shards' main group), 'refine' (kidney windows at the finer "
        "spacing, shards' refine group, 2.5D), or 'both' one after the other into RUN/locate and RUN/refine"))
    schedule: ScheduleConfig = _section(ScheduleConfig, "epochs, steps, validation")
    data: DataConfig = _section(DataConfig, "batches and loading")
    optim: OptimConfig = _section(OptimConfig, "optimizer and learning rate")
    loss: LossConfig = _section(LossConfig, "loss weights")
    horovod: HorovodConfig = _section(HorovodConfig, "gradient reduction")
    engine: Optional[Literal["horovod", "torch"]] = field(default=None, metadata=_h(
        "the gradient engine: horovod (Horovod ring-allreduce) or torch (torch.distributed: Gloo on CPU, NCCL "
        "on CUDA); unset = $HPC_DFS_ENGINE, else torch under torchrun, else horovod"))
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "checkpoints kept")
    # --- precision, performance, determinism, logging
    amp: Literal["auto", "off", "fp16", "bf16"] = field(default="auto", metadata=_h(
        "mixed precision on CUDA (auto = fp16 with GradScaler); always fp32 on CPU"))
    threads: int = field(default=0, metadata=_h("torch threads per rank; 0 = cores // ranks per node"))
    seed: int = field(default=0, metadata=_h("seed of the model init, batch sequence, augmentation and dropout"))
    deterministic: bool = field(default=False, metadata=_h(
        "deterministic algorithms (torch.use_deterministic_algorithms), bit-reproducible on CPU; dropout masks drawn "
        "from (seed, step, global sample index), so N ranks match 1 rank (see 'Rank invariance' below)"))
    log_every: int = field(default=50, metadata=_h("log a progress line every N steps (no TTY)"))
    tensorboard: bool = field(default=False, metadata=_h("also write TensorBoard events to RUN/tb"))
    # --- set with --set model.KEY=... / augmentation.KEY=...
    model: ModelConfig = _section(ModelConfig, "the network", flags=False)
    augmentation: AugmentConfig = _section(AugmentConfig, "training augmentation", flags=False)

    def validate(self) -> None:
        _at_least("", self, ("log_every",), 1)
        _at_least("", self, ("threads",), 0)
        if self.engine is not None:
            self.check_engine(self.engine)

    def check_engine(self, engine: str) -> None:
        """Refuse the Horovod-only features under another engine (one line; never a silent no-op).

        Args:
            engine: the engine the run will use (``horovod`` or ``torch``).

        Raises:
            ConfigError: ``horovod.adasum``, ``horovod.timeline`` or ``horovod.autotune`` with ``engine='torch'``.
        """
        if engine == "horovod":
            return
        used = [f"--{name}" for name, on in (("adasum", self.horovod.adasum), ("timeline", self.horovod.timeline),
                                             ("autotune", self.horovod.autotune)) if on]
        if used:
            raise ConfigError(f"{' and '.join(used)} exist{'s' if len(used) == 1 else ''} only in Horovod, but this "
                              f"run uses the {engine} engine: drop {'it' if len(used) == 1 else 'them'}, or train "
                              f"with --engine horovod")

    @classmethod
    def from_stored(cls, data: dict) -> "TrainConfig":
        """The config a checkpoint stored (``config``), in either layout: sections, or the flat one of runs
        trained before the sections (``{"lr": ..., "epochs": ...}``), which is moved into them.

        Raises:
            ConfigError: a key or value that no version of TrainConfig had.
        """
        return from_dict(cls, nest_flat(cls, data))

    # ------------------------------------------------------------------ derived values
    @property
    def context(self) -> int:
        """Slices per input: ``data.context``, or its stage default (1 locate, 3 refine)."""
        return self.data.context or (3 if self.stage == "refine" else 1)

    def resolve_global_batch(self, world_size: int) -> int:
        """The global batch for ``world_size`` ranks; raises :class:`ConfigError` if it cannot be split."""
        k = self.horovod.backward_passes_per_step
        gb = self.data.global_batch_size or self.data.batch_size * world_size * k
        parts = world_size * k
        if gb % parts:
            raise ConfigError(
                f"global_batch_size {gb} cannot be split evenly over {world_size} ranks x "
                f"{k} backward passes per step ({parts} parts): choose a multiple of {parts}")
        return gb

    def lr_scale(self, world_size: int) -> float:
        """Factor applied to ``optim.lr`` (see the module docstring)."""
        if self.horovod.adasum or self.optim.lr_scaling == "none":
            return 1.0
        ratio = self.resolve_global_batch(world_size) / float(self.data.batch_size)
        return ratio if self.optim.lr_scaling == "linear" else ratio ** 0.5
