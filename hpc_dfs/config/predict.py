"""Settings of the inference end of the pipeline: ``predict``, its post-processing, and ``evaluate``.

Every field can be set in a TOML file (``--config``), with ``--set key=value`` (nested ones too, e.g.
``--set postprocess.min_component_mm3=50``) or, for top-level scalars, with a ``--flag``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hpc_dfs.config import ConfigError

#: KiTS21 normalised-surface-Dice tolerances in mm per hierarchical evaluation class (HEC), from
#: neheller/kits21 ``kits21/configuration/labels.py`` (``HEC_NSD_TOLERANCES_MM``, computed by
#: ``kits21/evaluation/compute_tolerances.py`` from inter-rater disagreement).
KITS21_NSD_TOLERANCES_MM = {
    "kidney_and_mass": 2.1780822681004897,
    "mass": 1.3929527150618852,
    "tumor": 1.536272517110166,
}


@dataclass
class PostprocessConfig:
    """Connected-component clean-up of a predicted label map (see :mod:`hpc_dfs.postprocess`)."""

    enabled: bool = field(default=True, metadata={"help": "apply post-processing at all"})
    largest_kidney_per_side: bool = field(
        default=True,
        metadata={"help": "keep only the largest kidney(+mass) component left and right of the body midline"})
    remove_mass_outside_kidney: bool = field(
        default=True, metadata={"help": "drop tumour/cyst components that do not touch the (dilated) kidney"})
    kidney_margin_mm: float = field(
        default=5.0, metadata={"help": "dilation of the kidney region (mm) used by remove_mass_outside_kidney"})
    min_component_mm3: float = field(
        default=100.0, metadata={"help": "components smaller than this (mm^3) are removed; 0 switches it off"})

    def validate(self) -> None:
        if self.kidney_margin_mm < 0:
            raise ConfigError(f"postprocess.kidney_margin_mm must be >= 0, got {self.kidney_margin_mm}")
        if self.min_component_mm3 < 0:
            raise ConfigError(f"postprocess.min_component_mm3 must be >= 0, got {self.min_component_mm3}")


@dataclass
class PredictConfig:
    """``hpc-dfs predict``: whole-volume inference back to the native grid.

    The paths (``--checkpoint``, ``--input``, ``--out``, ``--clinical``) are argparse arguments of the stage,
    not settings; that each ``--weights`` entry has its ``--checkpoint`` is checked there.
    """

    weights: list[float] = field(default_factory=list,
                                 metadata={"help": "one weight per checkpoint for the probability average "
                                                   "(default: equal)"})
    refine_weights: list[float] = field(default_factory=list, metadata={
        "help": "cascade: one weight per --refine-checkpoint for the average of stage-2 probabilities"})
    refine_blend: float = field(default=0.0, metadata={
        "help": "cascade: weight of stage 1's probabilities inside stage 2's windows (0 = stage 2 alone; 0.5 = the "
                "mean of both stages)"})
    batch_size: int = field(default=32, metadata={"help": "slices per forward pass"})
    tta: bool = field(default=False, metadata={"help": "flip test-time augmentation (H, W and both flips)"})
    save_probabilities: bool = field(default=False, metadata={"help": "also write probabilities_XXXXX.nii.gz "
                                                                      "(float32, classes last)"})
    save_raw: bool = field(default=False, metadata={"help": "also write the label map before post-processing to "
                                                            "OUT/raw/ (evaluate then reports the effect)"})
    overlays: bool = field(default=True, metadata={"help": "write overlay_XXXXX.png per case"})
    threads: int = field(default=1, metadata={"help": "CPU threads per rank; fixed by default so that outputs are "
                                                      "byte-identical for any number of ranks (0 = cores/ranks)"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA of the local rank if present), cpu or cuda"})
    compress_level: int = field(default=6, metadata={"help": "gzip level of the written NIfTI files (1-9)"})
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        for name, ws in (("--weights", self.weights), ("--refine-weights", self.refine_weights)):
            if any(w < 0 for w in ws) or (ws and sum(ws) <= 0):
                raise ConfigError(f"{name} must be >= 0 with a positive sum, got {ws}")
        if not 0.0 <= self.refine_blend <= 1.0:
            raise ConfigError(f"refine_blend must be in [0, 1], got {self.refine_blend}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 1 <= self.compress_level <= 9:
            raise ConfigError(f"compress_level must be 1..9, got {self.compress_level}")


@dataclass
class EvaluateConfig:
    """``hpc-dfs evaluate``: KiTS19 Dice, IoU, HD95, KiTS21 surface Dice and tumour detection per case.

    Settings only; the folders (``--pred``, ``--gt``, ``--out``, ``--pred-raw``) are command-line arguments.
    """

    hd_percentile: float = field(default=95.0, metadata={"help": "percentile of the Hausdorff distance"})
    kidney_tolerance_mm: float = field(default=KITS21_NSD_TOLERANCES_MM["kidney_and_mass"],
                                       metadata={"help": "surface-Dice tolerance of kidney+masses (KiTS21)"})
    tumor_tolerance_mm: float = field(default=KITS21_NSD_TOLERANCES_MM["tumor"],
                                      metadata={"help": "surface-Dice tolerance of tumour (KiTS21)"})
    surface_metrics: bool = field(default=True, metadata={"help": "compute HD95 and surface Dice (slower)"})
    strict: bool = field(default=False, metadata={
        "help": "a ground-truth case without a prediction is an error (exit 3); by default it is scored as an "
                "all-background prediction (Dice 0, as KiTS) in mean_all"})
    regions: str = field(default="kits19", metadata={
        "help": "kits19: kidney (label > 0) and tumour, Dice, IoU, HD95, KiTS21 surface Dice, detection; kits23: "
                "the official KiTS23 evaluation (kidney+masses {1,2,3}, masses {2,3}, tumour {2}; Dice and surface "
                "Dice at 1.0331/1.1329/1.1498 mm; evaluation.csv columns)"})

    def validate(self) -> None:
        if self.regions not in ("kits19", "kits23"):
            raise ConfigError(f"regions must be kits19 or kits23, got {self.regions!r}")
        if not 0 < self.hd_percentile <= 100:
            raise ConfigError(f"hd_percentile must be in (0, 100], got {self.hd_percentile}")
        if self.kidney_tolerance_mm < 0 or self.tumor_tolerance_mm < 0:
            raise ConfigError("surface-Dice tolerances must be >= 0")
