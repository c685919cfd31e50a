"""The clinical experiment's data: UCI CKD (.arff/.csv) or a KiTS kits.json, as features, target and ids."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hpc_dfs.errors import EXIT_USAGE, HpcDfsError

__all__ = ["ClinicalTableError", "ClinicalData", "load_data"]


_UCI_TARGETS = ("auto", "ckd", "class", "classification")


class ClinicalTableError(HpcDfsError, ValueError):
    """The data file cannot be used; the message names the file and the problem (exit code 2, as ever)."""

    code = EXIT_USAGE


@dataclass
class ClinicalData:
    """Features, 0/1 labels and what they are.

    Attributes:
        X: feature frame indexed by sample id (numeric columns float, nominal columns object).
        y: int array of 0/1 labels aligned with ``X``.
        levels: binary nominal columns -> (reference level, risk level), coded 0/1.
        source: the data file; kind: ``"uci_ckd"`` or ``"kits"``; target: target name;
        class_names: names of label 0 and label 1; n_unlabelled: rows left out for lack of a label.
    """

    X: pd.DataFrame
    y: np.ndarray
    levels: dict
    source: Path
    kind: str
    target: str
    class_names: tuple[str, str]
    n_unlabelled: int = 0


def load_data(path: str | Path, target: str = "auto", folds: int = 2) -> ClinicalData:
    """Load UCI CKD (``.arff``/``.csv``) or KiTS records (``.json``, or a clinical CSV with a
    non-UCI ``target``) and check that stratified ``folds``-fold CV is possible.

    Raises:
        ClinicalTableError: missing file, unknown format, no target column, or a class with fewer
            rows than folds. One message naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ClinicalTableError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".arff", ".csv") and target in _UCI_TARGETS:
        from hpc_dfs.data.uci_ckd import FEATURES, NOMINAL_LEVELS, TARGET, UCICKDError, load_uci_ckd
        try:
            frame = load_uci_ckd(path)
        except UCICKDError as e:
            raise ClinicalTableError(str(e)) from None
        data = ClinicalData(X=frame[list(FEATURES)], y=frame[TARGET].to_numpy(dtype=int),
                            levels=dict(NOMINAL_LEVELS), source=path, kind="uci_ckd", target=TARGET,
                            class_names=("notckd", "ckd"))
    elif suffix == ".json" or (suffix == ".csv" and target not in _UCI_TARGETS):
        from hpc_dfs.data.kits_clinical import ClinicalRecordError, load_kits_records, preop_frame, risk_labels
        tgt = "malignant" if target == "auto" else target
        if suffix == ".csv":
            _require_csv_column(path, tgt)
        try:
            records = load_kits_records(path)
            X = preop_frame(records, target=tgt)
            labels = risk_labels(records, target=tgt)
        except (ClinicalRecordError, ValueError, FileNotFoundError) as e:
            raise ClinicalTableError(f"{path}: {e}") from None
        if labels.notna().sum() == 0:
            raise ClinicalTableError(f"{path}: no target column '{tgt}' (no record has a 0/1 value for it)")
        known = labels.notna().to_numpy()
        X, labels = X.loc[known], labels[known]
        data = ClinicalData(X=X, y=labels.to_numpy(dtype=int), levels={}, source=path, kind="kits",
                            target=tgt, class_names=(f"not {tgt}", tgt), n_unlabelled=int((~known).sum()))
    else:
        raise ClinicalTableError(
            f"{path}: unknown format {suffix or '(no suffix)'!r} for target {target!r}; expected a UCI CKD "
            ".arff/.csv (target auto/ckd) or a KiTS kits.json (--target malignant)")
    counts = np.bincount(data.y, minlength=2)
    for label, n in enumerate(counts):
        if n < folds:
            raise ClinicalTableError(
                f"{path}: class '{data.class_names[label]}' has only {n} rows, fewer than --folds {folds}; "
                "stratified cross-validation needs at least one row of each class per fold")
    return data


def _require_csv_column(path: Path, target: str) -> None:
    """A clinical CSV must hold the ``target`` column (flattened name, e.g. ``malignant``) before anything else.

    Raises:
        ClinicalTableError: the header cannot be read, or it has no ``target`` column; names the file and target.
    """
    try:
        columns = [c.strip() for c in pd.read_csv(path, dtype=str, nrows=0).columns]
    except (ValueError, OSError) as e:
        raise ClinicalTableError(f"{path}: cannot read the CSV header: {e}") from None
    if target not in columns:
        shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
        raise ClinicalTableError(f"{path}: no target column '{target}' (the CSV has {len(columns)} columns: {shown}); "
                                "UCI CKD takes --target auto/ckd, a KiTS table a 0/1 column such as malignant")
