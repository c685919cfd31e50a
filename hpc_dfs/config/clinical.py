"""Settings of ``hpc-dfs clinical``: the Clinical-GRU k-fold experiment with baselines and SHAP."""
from __future__ import annotations

from dataclasses import dataclass, field

from hpc_dfs.config import ConfigError

__all__ = ["ClinicalConfig"]


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class ClinicalConfig:
    """Everything ``hpc-dfs clinical`` needs; every field is also a ``--flag``.

    The GRU defaults are the stable recipe measured on UCI CKD (see :mod:`hpc_dfs.tabular`):
    full-batch AdamW with a cosine learning-rate schedule, gradient clipping, a class-balanced
    loss and early stopping on an inner stratified split of each training fold. The paths (``--data``,
    ``--out``) are argparse arguments of the stage, not settings.
    """

    target: str = field(default="auto", metadata=_h(
        "target column: 'auto' = ckd for UCI CKD, malignant for kits.json"))
    folds: int = field(default=5, metadata=_h("number of stratified cross-validation folds"))
    seed: int = field(default=0, metadata=_h("seed of the fold split, the inner split and the GRU"))
    models: list[str] = field(default_factory=lambda: ["gru", "logistic_regression", "random_forest"],
                              metadata=_h("models to run, comma-separated"))
    # Clinical-GRU (architecture fixed by the paper: GRU(32) -> dropout -> Linear(32, 1))
    hidden: int = field(default=32, metadata=_h("GRU hidden size (paper: 32, 3,393 parameters)"))
    dropout: float = field(default=0.2, metadata=_h("dropout before the output layer"))
    epochs: int = field(default=400, metadata=_h("maximum GRU epochs per fold"))
    batch_size: int = field(default=0, metadata=_h("GRU batch size; 0 = full batch"))
    lr: float = field(default=1e-2, metadata=_h("peak learning rate (AdamW, cosine decay after warm-up)"))
    weight_decay: float = field(default=1e-4, metadata=_h("AdamW weight decay"))
    warmup_epochs: int = field(default=10, metadata=_h("linear learning-rate warm-up epochs"))
    grad_clip: float = field(default=1.0, metadata=_h("clip the gradient norm to this (0 = off)"))
    patience: int = field(default=80, metadata=_h("early-stopping patience in epochs on the inner validation loss"))
    val_fraction: float = field(default=0.25, metadata=_h("share of each training fold held out for early stopping"))
    balanced: bool = field(default=True, metadata=_h("weight the loss by inverse class frequency"))
    threshold: float = field(default=0.5, metadata=_h("probability threshold for y_pred (all models)"))
    # baselines
    rf_trees: int = field(default=500, metadata=_h("random-forest trees"))
    # SHAP
    shap: bool = field(default=True, metadata=_h("explain the GRU with SHAP (KernelExplainer, log-odds)"))
    shap_background: int = field(default=10, metadata=_h("k-means background summary size per fold for SHAP"))
    shap_samples: int = field(default=300, metadata=_h("KernelExplainer coalition samples per explained row"))
    shap_rows: int = field(default=100, metadata=_h(
        "how many out-of-fold patients SHAP explains, spread over the folds (0 = all)"))
    explain_id: str = field(default="", metadata=_h(
        "id of the patient for the per-patient SHAP plot (default: highest-risk true positive)"))
    threads: int = field(default=1, metadata=_h("torch CPU threads"))

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        known = {"gru", "logistic_regression", "random_forest"}
        bad = [m for m in self.models if m not in known]
        if bad or not self.models:
            raise ConfigError(f"models must be a non-empty subset of {sorted(known)}, got {self.models}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.lr <= 0 or self.batch_size < 0 or self.patience < 1 or self.rf_trees < 1:
            raise ConfigError("lr must be > 0, batch_size >= 0, patience >= 1 and rf_trees >= 1")
        if self.shap_background < 1 or self.shap_samples < 1 or self.threads < 1 or self.shap_rows < 0:
            raise ConfigError("shap_background, shap_samples and threads must be >= 1, shap_rows >= 0")
