"""Settings of the data stages: ``hpc-dfs synth`` (:class:`SynthConfig`) and ``hpc-dfs preprocess``
(:class:`PreprocessConfig`).

Defaults suit a GPU cluster (256x256 slices); tests pass small sizes explicitly, e.g.
``--slice-size 64,64``. Every field can also be set in a TOML file (``--config FILE``) or with
``--set key=value``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from hpc_dfs.config import ConfigError

__all__ = ["SynthConfig", "PreprocessConfig", "RefineConfig", "parse_label_map"]


@dataclass
class SynthConfig:
    """Synthetic KiTS generator settings (``hpc-dfs synth``)."""

    cases: str = field(default="8", metadata={"help": "number of cases, or with --from-labels a comma "
                                                      "list of case ids (case_00002,case_00004) or a count"})
    seed: int = field(default=0, metadata={"help": "random seed; the output is a function of it"})
    size: int = field(default=128, metadata={"help": "phantoms: in-plane size in pixels (rows = cols)"})
    min_slices: int = field(default=24, metadata={"help": "phantoms: fewest axial slices"})
    max_slices: int = field(default=48, metadata={"help": "phantoms: most axial slices"})
    from_labels: Optional[str] = field(default=None, metadata={
        "help": "render CT around the real KiTS19 or KiTS23 label maps (case_XXXXX/segmentation.nii.gz)"})
    kits_json: Optional[str] = field(default=None, metadata={
        "help": "with --from-labels: the real kits.json whose records are attached"})
    first_case: int = field(default=0, metadata={"help": "phantoms: number of the first case id"})
    style: Literal["default", "random", "streak"] = field(default="default", metadata={
        "help": "how the CT looks: 'default' (the project's CT model), 'random' (domain randomisation, SynthSeg "
                "style: random per-structure intensities, textures, fat rim, bias, blur, resolution) or 'streak' "
                "(the held-out unseen renderer for validation); the labels and records do not depend on it"})

    def validate(self) -> None:
        if self.size < 32:
            raise ConfigError(f"synth size must be >= 32 pixels, got {self.size}")
        if not 4 <= self.min_slices <= self.max_slices:
            raise ConfigError(f"synth needs 4 <= min_slices <= max_slices, got {self.min_slices}, {self.max_slices}")
        if self.from_labels is None and not self.cases.strip().isdigit():
            raise ConfigError(f"--cases must be a count for phantoms, got '{self.cases}'")


def _spacing_setting(key: str, value: str, words: tuple[str, ...]) -> None:
    """A spacing setting is one of ``words`` or a positive number of mm; else a ConfigError naming ``key``."""
    if value in words:
        return
    try:
        ok = math.isfinite(float(value)) and float(value) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{key} must be {', '.join(repr(w) for w in words)} or a positive finite number, got "
                          f"'{value}'")


@dataclass
class RefineConfig:
    """Stage 2 of the cascade (``refine``): windows around every ground-truth kidney, at a finer in-plane
    spacing, written into each shard's ``refine`` group (see :mod:`hpc_dfs.data.refine`)."""

    enabled: bool = field(default=True, metadata={"help": "write the stage-2 windows (refine group) into the shards"})
    spacing: str = field(default="auto", metadata={
        "help": "in-plane spacing of stage 2 in mm: 'auto' (median in-plane spacing of the data, nnU-Net's "
                "full resolution), 'finest', or a number"})
    slice_size: list[int] = field(default_factory=lambda: [128, 128], metadata={
        "help": "H,W of a training window's slices (multiples of 16; predict grows them for larger boxes)"})
    margin_mm: float = field(default=15.0, metadata={"help": "margin added on every side of a kidney box, mm"})
    min_box_mm: list[float] = field(default_factory=lambda: [30.0, 48.0, 48.0], metadata={
        "help": "least box extent (z, y, x) in mm"})
    max_boxes: int = field(default=2, metadata={"help": "kidney components kept per case (2: one per kidney)"})

    def validate(self) -> None:
        if len(self.slice_size) != 2 or min(self.slice_size) < 16 or any(v % 16 for v in self.slice_size):
            raise ConfigError(f"refine.slice_size must be two multiples of 16, got {self.slice_size}")
        _spacing_setting("refine.spacing", self.spacing, ("auto", "finest"))
        if self.margin_mm < 0 or len(self.min_box_mm) != 3 or min(self.min_box_mm) < 0 or self.max_boxes < 1:
            raise ConfigError("refine needs margin_mm >= 0, three min_box_mm >= 0 and max_boxes >= 1, got "
                              f"{self.margin_mm}, {self.min_box_mm}, {self.max_boxes}")


#: the models' default number of poolings (``model.depth``) and the slice size it needs to exceed (2**depth)
DEFAULT_DEPTH = 4
MIN_SLICE = 2 ** DEFAULT_DEPTH


@dataclass
class PreprocessConfig:
    """KiTS-layout data -> HDF5 shards (``hpc-dfs preprocess``)."""

    slice_size: list[int] = field(default_factory=lambda: [256, 256], metadata={
        "help": "H,W of every axial slice in the shards"})
    in_plane_spacing: str = field(default="auto", metadata={
        "help": "in-plane target spacing in mm: 'auto' (from the fingerprint: the median field of view just "
                "fits slice_size), 'fit' (per case, the whole field of view fits), or a number"})
    z_spacing: Optional[float] = field(default=None, metadata={
        "help": "target slice spacing in mm; unset keeps every native axial slice"})
    intensity: Literal["ct", "window"] = field(default="ct", metadata={
        "help": "'ct': clip to foreground percentiles over the training cases, then z-score (nnU-Net); "
                "'window': fixed HU window mapped to [-1, 1]"})
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5], metadata={
        "help": "foreground percentiles for the 'ct' clip"})
    window: list[float] = field(default_factory=lambda: [-200.0, 300.0], metadata={
        "help": "HU window for intensity=window"})
    fg_samples_per_case: int = field(default=10000, metadata={
        "help": "foreground voxels sampled per case for the intensity statistics"})
    dataset: Literal["auto", "kits19", "kits21", "kits23"] = field(default="auto", metadata={
        "help": "input layout and label set; auto detects it"})
    label_map: str = field(default="auto", metadata={
        "help": "raw label -> class: auto by dataset (KiTS19 0:0,1:1,2:2; KiTS21/23 0:0,1:1,2:2,3:3, the "
                "cyst a 4th class), or e.g. '0:0,1:1,2:2,3:1' (a KiTS21/23 cyst counted as kidney)"})
    clinical: str = field(default="auto", metadata={
        "help": "clinical records: 'auto' (DATA/kits.json or kits23.json), a .json/.csv path, or 'none'"})
    n_folds: int = field(default=5, metadata={"help": "cross-validation folds, assigned by case"})
    seed: int = field(default=0, metadata={"help": "seed of the fold assignment and voxel sampling"})
    cache_mb: int = field(default=2048, metadata={
        "help": "MiB per rank for keeping resampled cases in memory between the fingerprint and writing "
                "passes (cases beyond it are decoded twice)"})
    memory_limit_mb: int = field(default=0, metadata={
        "help": "MiB of memory one rank may use for a case; a case whose estimated need (from its headers) is "
                "larger fails with one line instead of an OOM kill. 0: the node's free memory (cgroup limit "
                "included) divided by its ranks"})
    compression: Literal["lzf", "gzip", "none"] = field(default="none", metadata={
        "help": "HDF5 compression of the slice datasets (none: memory-mapped reads at the memmap floor; "
                "lzf/gzip: 4-5x smaller shards, 4-5x slower reads; see bench/bench_reader.py)"})
    compression_level: int = field(default=1, metadata={"help": "gzip level when compression=gzip"})
    refine: RefineConfig = field(default_factory=RefineConfig, metadata={
        "help": "stage-2 (refine) windows: refine.enabled, refine.spacing, refine.slice_size, ..."})

    def validate(self) -> None:
        if len(self.slice_size) != 2 or min(self.slice_size) <= MIN_SLICE:
            raise ConfigError(f"slice_size must be two sizes > {MIN_SLICE}, got {self.slice_size}: the segmentation "
                              f"models pool {DEFAULT_DEPTH} times (model.depth), so the deepest feature map of a "
                              f"slice is its size / {MIN_SLICE}, rounded up, and needs at least 2x2 pixels")
        _spacing_setting("in_plane_spacing", self.in_plane_spacing, ("auto", "fit"))
        if self.z_spacing is not None and self.z_spacing <= 0:
            raise ConfigError(f"z_spacing must be positive, got {self.z_spacing}")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ConfigError(f"percentiles must be two increasing values in [0, 100], got {self.percentiles}")
        if len(self.window) != 2 or self.window[0] >= self.window[1]:
            raise ConfigError(f"window must be [low, high] HU with low < high, got {self.window}")
        if self.memory_limit_mb < 0:
            raise ConfigError(f"memory_limit_mb must be >= 0 (0: auto), got {self.memory_limit_mb}")
        if self.n_folds < 1:
            raise ConfigError(f"n_folds must be >= 1, got {self.n_folds}")
        if self.fg_samples_per_case < 10:
            raise ConfigError(f"fg_samples_per_case must be >= 10, got {self.fg_samples_per_case}")
        if self.label_map != "auto":
            parse_label_map(self.label_map)


def parse_label_map(text: str) -> dict[int, int]:
    """``'0:0,1:1,2:2,3:1'`` -> ``{0: 0, 1: 1, 2: 2, 3: 1}`` (raw label -> class index)."""
    out: dict[int, int] = {}
    try:
        for item in text.split(","):
            raw, cls = item.split(":")
            out[int(raw)] = int(cls)
    except ValueError:
        raise ConfigError(f"label_map must look like '0:0,1:1,2:2', got '{text}'") from None
    if out.get(0, None) != 0:
        raise ConfigError(f"label_map must map 0 (background) to 0, got '{text}'")
    return out
