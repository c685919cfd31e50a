"""Clinical records of KiTS cases -> model inputs (pre-operative fields only) and risk labels.

Sources: KiTS19 ``kits.json``, KiTS23 ``kits23.json`` (renamed fields such as ``bmi``) or a plain
CSV keyed by ``case_id`` whose columns use the flattened names below (``comorbidities.copd``,
``last_preop_egfr.value`` or just ``last_preop_egfr``).

**Only pre-operative fields become inputs** (:data:`NUMERIC`, :data:`CATEGORICAL`, :data:`BOOLEAN`):
age, gender, BMI, comorbidities, smoking/chewing/alcohol, radiographic tumour size and the last
pre-operative eGFR. Surgical, pathology and outcome fields (``malignant``, histology, stage, ISUP
grade, complications, post-operative eGFR, vital status, surgery type/approach/procedure, which
the surgeon chose after imaging) may only be *targets*; :func:`risk_labels` gives ``malignant``.

The real files mix types: ``"not_applicable"``, ``">=90"``, ``null``, numbers as strings
(``"50"``). These are read as values or missing; anything else (``"abc"`` as an age, a number as a
gender) is a :class:`ClinicalRecordError` naming the case and field.

:class:`ClinicalPipeline` is an sklearn ``ColumnTransformer`` (median imputation with missing
indicators + ``StandardScaler`` for numbers; missing categories become their own category
"missing" before the ``OneHotEncoder``) fitted on the training cases only. Its fitted numbers are exported to plain JSON
(:meth:`ClinicalPipeline.to_json`) so that ``predict`` rebuilds it without pickle;
:meth:`ClinicalPipeline.transform` evaluates those numbers with numpy, so a pipeline rebuilt by
:meth:`ClinicalPipeline.from_json` gives bit-identical features (the unit tests check that the
numpy evaluation equals sklearn's own ``transform``).

Usage::

    from hpc_dfs.data.kits_clinical import load_kits_records, preop_frame, risk_labels, ClinicalPipeline
    records = load_kits_records("data/kits/kits.json")
    X = preop_frame(records)                        # DataFrame indexed by case_id
    y = risk_labels(records)                        # Series: 1.0 malignant, 0.0 benign, NaN unknown
    pipe = ClinicalPipeline().fit(X.loc[train_ids])
    feats = pipe.transform(X)                       # float32 (n_cases, n_features)
    same = ClinicalPipeline.from_json(pipe.to_json())
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from hpc_dfs.contracts.kits import CLINICAL_FILES
from hpc_dfs.errors import EXIT_DATA, HpcDfsError

__all__ = ["ClinicalRecordError", "NUMERIC", "CATEGORICAL", "BOOLEAN", "PREOP_COLUMNS", "TARGET_FIELDS",
           "load_kits_records", "find_clinical_file", "flatten_record", "preop_features", "preop_frame", "duplicates",
           "risk_label", "risk_labels", "ClinicalPipeline"]

#: numeric pre-operative fields (KiTS19 names; KiTS23 aliases in _ALIASES)
NUMERIC = ["age_at_nephrectomy", "body_mass_index", "pack_years", "age_when_quit_smoking", "radiographic_size",
           "last_preop_egfr"]
#: categorical pre-operative fields
CATEGORICAL = ["gender", "smoking_history", "chewing_tobacco_use", "alcohol_use"]
#: pre-operative comorbidities (booleans, read as 0/1)
BOOLEAN = ["comorbidities." + c for c in (
    "myocardial_infarction", "congestive_heart_failure", "peripheral_vascular_disease", "cerebrovascular_disease",
    "dementia", "copd", "connective_tissue_disease", "peptic_ulcer_disease", "uncomplicated_diabetes_mellitus",
    "diabetes_mellitus_with_end_organ_damage", "chronic_kidney_disease", "hemiplegia_from_stroke", "leukemia",
    "malignant_lymphoma", "localized_solid_tumor", "metastatic_solid_tumor", "mild_liver_disease",
    "moderate_to_severe_liver_disease", "aids")]
PREOP_COLUMNS = NUMERIC + CATEGORICAL + BOOLEAN
#: fields that may only ever be targets (never inputs); listed for documentation and tests
TARGET_FIELDS = ["malignant", "pathologic_size", "pathology_t_stage", "pathology_n_stage", "pathology_m_stage",
                 "tumor_histologic_subtype", "tumor_necrosis", "tumor_isup_grade", "clavien_surgical_complications",
                 "er_visit", "readmission", "estimated_blood_loss", "surgery_type", "surgical_procedure",
                 "surgical_approach", "operative_time", "cytoreductive", "positive_resection_margins",
                 "first_postop_egfr", "last_postop_egfr", "vital_status", "vital_days_after_surgery",
                 "hospitalization", "ischemia_time", "intraoperative_complications", "sarcomatoid_features",
                 "rhabdoid_features", "aua_risk_score"]
_ALIASES = {"bmi": "body_mass_index"}
#: strings that mean "no value" in the real files
_MISSING = {"", "na", "n/a", "nan", "null", "none", "not_applicable", "unknown", "not_available", "?"}
_MISSING_CATEGORY = "missing"  # a missing category is a category of its own (unknown smoking status says something)
_BOUND = re.compile(r"^\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+)\s*$")
#: plausible ranges; values outside are malformed (e.g. an age of 400)
_RANGES = {"age_at_nephrectomy": (0, 120), "body_mass_index": (8, 120), "pack_years": (0, 300),
           "age_when_quit_smoking": (0, 120), "radiographic_size": (0, 60), "last_preop_egfr": (0, 300)}


class ClinicalRecordError(HpcDfsError, ValueError):
    """A clinical record is missing or malformed; the message names case and field (exit code 3)."""

    code = EXIT_DATA

    def __init__(self, case_id: str, problem: str):
        self.case_id = case_id
        self.problem = problem
        super().__init__(f"[{case_id}] {problem}")


# ----------------------------------------------------------------------------- loading
def find_clinical_file(data_dir: str | Path) -> Optional[Path]:
    """``kits.json``, ``kits23.json`` or ``clinical.csv`` in ``data_dir`` (first found), else None."""
    for name in CLINICAL_FILES:
        if (Path(data_dir) / name).exists():
            return Path(data_dir) / name
    return None


def load_kits_records(path: str | Path) -> list[dict]:
    """Records from a KiTS ``.json`` (list of objects) or a ``.csv`` with a ``case_id`` column.

    CSV columns with dots (``comorbidities.copd``) are nested back into dicts; empty cells are None.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"clinical file {path} does not exist")
    if path.suffix.lower() == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "case_id" not in frame.columns:
            raise ValueError(f"{path}: a clinical CSV needs a 'case_id' column (has {list(frame.columns)[:8]}...)")
        records = []
        for row in frame.to_dict(orient="records"):
            rec: dict = {}
            for k, v in row.items():
                v = None if v.strip() == "" else v.strip()
                parts = k.strip().split(".")
                d = rec
                for p in parts[:-1]:
                    d = d.setdefault(p, {})
                d[parts[-1]] = v
            records.append(rec)
        return _not_empty(records, path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "case_id" in r for r in data):
        raise ValueError(f"{path}: expected a JSON list of records with 'case_id' (the KiTS kits.json schema)")
    return _not_empty(data, path)


def _not_empty(records: list[dict], path: Path) -> list[dict]:
    """``records``, unless there are none: an empty records file is one error naming it, not one per case."""
    if not records:
        raise ValueError(f"{path} holds no clinical records (an empty list or table)")
    return records


def flatten_record(record: dict) -> dict:
    """``{"comorbidities": {"copd": true}}`` -> ``{"comorbidities.copd": True}``; KiTS23 aliases applied.

    ``{"last_preop_egfr": {"value": 80}}`` becomes ``last_preop_egfr: 80``.
    """
    out: dict = {}
    for k, v in record.items():
        k = _ALIASES.get(k, k)
        if isinstance(v, dict):
            if "value" in v and k.endswith("egfr"):
                out[k] = v["value"]
            else:
                for kk, vv in v.items():
                    out[f"{k}.{kk}"] = vv
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- value parsing
def _number(cid: str, name: str, v: Any) -> float:
    if v is None or isinstance(v, bool):
        if isinstance(v, bool):
            raise ClinicalRecordError(cid, f"malformed clinical value {name}={v!r} (expected a number)")
        return math.nan
    if isinstance(v, (int, float, np.integer, np.floating)):
        x = float(v)
    elif isinstance(v, str):
        s = v.strip().lower()
        if s in _MISSING:
            return math.nan
        m = _BOUND.match(s)
        try:
            x = float(m.group(2)) if m else float(s)  # ">=90" -> 90: the censoring bound itself
        except ValueError:
            raise ClinicalRecordError(cid, f"malformed clinical value {name}={v!r} (expected a number)") from None
    else:
        raise ClinicalRecordError(cid, f"malformed clinical value {name}={v!r} (expected a number)")
    if not math.isfinite(x):
        return math.nan
    lo, hi = _RANGES.get(name, (-math.inf, math.inf))
    if not lo <= x <= hi:
        raise ClinicalRecordError(cid, f"malformed clinical value {name}={v!r} "
                                       f"(outside the plausible range {lo}..{hi})")
    return x


def _category(cid: str, name: str, v: Any) -> Optional[str]:
    if v is None:
        return None
    if not isinstance(v, str):
        raise ClinicalRecordError(cid, f"malformed clinical value {name}={v!r} (expected a category string)")
    s = v.strip().lower()
    return None if s in _MISSING else s


def _boolean(cid: str, name: str, v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return float(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "yes", "1"):
            return 1.0
        if s in ("false", "no", "0"):
            return 0.0
        if s in _MISSING:
            return math.nan
    raise ClinicalRecordError(cid, f"malformed clinical value {name}={v!r} (expected true/false)")


def preop_features(record: dict) -> dict:
    """The pre-operative inputs of one record as ``{column: value}`` (floats, strings or None/NaN).

    Raises :class:`ClinicalRecordError` for a malformed value. Post-operative fields are never read.
    """
    cid = str(record.get("case_id", "?"))
    flat = flatten_record(record)
    out: dict = {}
    for name in NUMERIC:
        out[name] = _number(cid, name, flat.get(name))
    for name in CATEGORICAL:
        out[name] = _category(cid, name, flat.get(name))
    for name in BOOLEAN:
        out[name] = _boolean(cid, name, flat.get(name))
    return out


def duplicates(records: Iterable[dict]) -> dict[str, str]:
    """``{case_id: message}`` of the cases listed more than once, naming the first field on which they disagree.

    Args:
        records: KiTS records.
    """
    seen: dict[str, dict] = {}
    bad: dict[str, str] = {}
    for rec in records:
        cid = str(rec.get("case_id"))
        if cid not in seen:
            seen[cid] = flatten_record(rec)
            continue
        a, b = seen[cid], flatten_record(rec)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        how = (f"disagreeing on {diff[0]} ({a.get(diff[0])!r} vs {b.get(diff[0])!r})" if diff else
               "identically: keep one")
        bad.setdefault(cid, f"[{cid}] has two clinical records, {how}")
    return bad


def preop_frame(records: Iterable[dict], errors: str = "raise",
                target: str | None = None) -> pd.DataFrame | tuple[pd.DataFrame, dict]:
    """Pre-operative features of all records: a DataFrame indexed by ``case_id`` with :data:`PREOP_COLUMNS`.

    Args:
        records: KiTS records (from :func:`load_kits_records`).
        errors: 'raise' (first malformed record raises :class:`ClinicalRecordError`) or 'collect' (malformed
            records are left out and ``(frame, {case_id: message})`` is returned).
        target: a field whose value must read as a label (:func:`risk_label`) too (``"malignant"``: preprocess's
            risk label, clinical's target), or None: the features alone, no post-operative field read.

    Raises:
        ClinicalRecordError: (``errors="raise"``) a malformed value, a malformed ``target``, or a case listed twice.
    """
    records = list(records)
    twice = duplicates(records)
    rows, index, bad = [], [], {}
    for rec in records:
        try:
            cid = str(rec["case_id"])
            if cid in twice:
                raise ClinicalRecordError(cid, twice[cid].split("] ", 1)[1])
            rows.append(preop_features(rec))
            if target is not None:
                risk_label(rec, target)
            index.append(cid)
        except ClinicalRecordError as e:
            if errors == "raise":
                raise
            bad[e.case_id] = str(e)
            if len(rows) > len(index):
                rows.pop()
    frame = pd.DataFrame(rows, index=pd.Index(index, name="case_id"), columns=PREOP_COLUMNS)
    for c in NUMERIC + BOOLEAN:
        frame[c] = frame[c].astype(float)
    for c in CATEGORICAL:
        frame[c] = frame[c].astype(object)
    return (frame, bad) if errors == "collect" else frame


def risk_label(record: dict, target: str = "malignant") -> Optional[int]:
    """The case-level label (``malignant`` by default): 1, 0, or None when unknown (absent or a missing-value word).

    Raises:
        ClinicalRecordError: a value that is neither a label nor missing (``"yes (clear cell)"``, 2, 0.5): it would
            otherwise become an unknown label without a word. Names the case and the field.
    """
    v = flatten_record(record).get(target)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, float)) and v in (0, 1):
        return int(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return int(v.strip().lower() in ("true", "1", "yes"))
    if isinstance(v, str) and v.strip().lower() in _MISSING:
        return None
    raise ClinicalRecordError(str(record.get("case_id", "?")), f"malformed clinical value {target}={v!r} "
                                                              "(expected true/false, 1/0, or empty when unknown)")


def risk_labels(records: Iterable[dict], target: str = "malignant") -> pd.Series:
    """Case-level labels as a float Series indexed by ``case_id``: 1.0, 0.0, NaN when unknown."""
    ids, vals = [], []
    for rec in records:
        lab = risk_label(rec, target)
        ids.append(str(rec["case_id"]))
        vals.append(np.nan if lab is None else float(lab))
    return pd.Series(vals, index=pd.Index(ids, name="case_id"), name=target, dtype=float)


# ----------------------------------------------------------------------------- the fitted pipeline
class ClinicalPipeline:
    """Impute + scale + one-hot, fitted with sklearn on training cases, stored as plain JSON.

    Output columns, in order: numeric/boolean columns, their missing indicators (only for columns
    that had missing values when fitted, as ``SimpleImputer(add_indicator=True)`` does), all
    standardised, then one-hot categories (unknown categories encode as all zeros).
    """

    def __init__(self) -> None:
        self.params: Optional[dict] = None
        self.sklearn_ = None  # the fitted ColumnTransformer (only after fit, not after from_json)

    # -- fitting with sklearn
    def fit(self, frame: pd.DataFrame) -> "ClinicalPipeline":
        """Fit on a frame from :func:`preop_frame` (training cases only)."""
        from sklearn.compose import ColumnTransformer
        from sklearn.impute import SimpleImputer
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        if len(frame) == 0:
            raise ValueError("cannot fit the clinical pipeline on zero cases")
        num_cols = NUMERIC + BOOLEAN
        num = frame[num_cols].astype(float)
        # columns with no observed value at all cannot be imputed: sklearn would drop them; we keep
        # the column count stable by filling them with 0 before fitting (documented in the JSON)
        all_missing = [c for c in num_cols if num[c].isna().all()]
        num = num.fillna({c: 0.0 for c in all_missing})
        cat = frame[CATEGORICAL].astype(object).where(frame[CATEGORICAL].notna(), _MISSING_CATEGORY)
        data = pd.concat([num, cat], axis=1)
        ct = ColumnTransformer([
            ("num", Pipeline([("impute", SimpleImputer(strategy="median", add_indicator=True)),
                              ("scale", StandardScaler())]), num_cols),
            ("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), CATEGORICAL),
        ])
        ct.fit(data)
        imp = ct.named_transformers_["num"].named_steps["impute"]
        scale = ct.named_transformers_["num"].named_steps["scale"]
        onehot = ct.named_transformers_["cat"]
        ind_cols = [num_cols[i] for i in imp.indicator_.features_] if imp.indicator_ is not None else []
        self.params = {
            "format": "hpc_dfs.ClinicalPipeline/1",
            "numeric": num_cols,
            "all_missing_filled_zero": all_missing,
            "median": [float(v) for v in imp.statistics_],
            "indicators": ind_cols,
            "mean": [float(v) for v in scale.mean_],
            "scale": [float(v) for v in scale.scale_],
            "categorical": CATEGORICAL,
            "missing_category": _MISSING_CATEGORY,
            "categories": [[str(c) for c in cats] for cats in onehot.categories_],
            "n_fit": int(len(frame)),
        }
        self.sklearn_ = ct
        return self

    def sklearn_transform(self, frame: pd.DataFrame) -> np.ndarray:
        """sklearn's own ``transform`` (only after :meth:`fit`), used to check :meth:`transform`."""
        num_cols = self.params["numeric"]
        num = frame[num_cols].astype(float).fillna({c: 0.0 for c in self.params["all_missing_filled_zero"]})
        cat = frame[CATEGORICAL].astype(object).where(frame[CATEGORICAL].notna(), _MISSING_CATEGORY)
        return self.sklearn_.transform(pd.concat([num, cat], axis=1)).astype(np.float32)

    # -- evaluation from the plain numbers
    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Features (float32, ``(n_cases, n_features)``) computed from the stored parameters."""
        p = self._fitted()
        num_cols = p["numeric"]
        x = frame[num_cols].to_numpy(dtype=np.float64, copy=True)
        for c in p["all_missing_filled_zero"]:
            j = num_cols.index(c)
            x[np.isnan(x[:, j]), j] = 0.0
        missing = np.isnan(x)
        x = np.where(missing, np.asarray(p["median"])[None, :], x)
        ind = missing[:, [num_cols.index(c) for c in p["indicators"]]].astype(np.float64)
        x = np.concatenate([x, ind], axis=1)  # the scaler sees values and indicators, as in sklearn
        x = (x - np.asarray(p["mean"])[None, :]) / np.asarray(p["scale"])[None, :]
        parts = [x]
        for j, col in enumerate(p["categorical"]):
            vals = frame[col].astype(object).where(frame[col].notna(), None).tolist()
            vals = [p["missing_category"] if v is None else str(v) for v in vals]
            cats = p["categories"][j]
            oh = np.zeros((len(vals), len(cats)))
            lookup = {c: i for i, c in enumerate(cats)}
            for i, v in enumerate(vals):
                if v in lookup:
                    oh[i, lookup[v]] = 1.0
            parts.append(oh)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def feature_names(self) -> list[str]:
        p = self._fitted()
        names = list(p["numeric"]) + [f"missing:{c}" for c in p["indicators"]]
        for col, cats in zip(p["categorical"], p["categories"]):
            names += [f"{col}={c}" for c in cats]
        return names

    @property
    def n_features(self) -> int:
        return len(self.feature_names())

    def _fitted(self) -> dict:
        if self.params is None:
            raise RuntimeError("ClinicalPipeline is not fitted: call fit() or from_json()")
        return self.params

    # -- plain JSON
    def to_json(self) -> dict:
        """The fitted parameters as a JSON-able dict (write with ``hpc_dfs.fsutil.write_json``)."""
        return json.loads(json.dumps(self._fitted()))

    @classmethod
    def from_json(cls, obj: dict | str | Path) -> "ClinicalPipeline":
        """Rebuild from :meth:`to_json`'s dict, a JSON string, or a path to ``clinical_pipeline.json``."""
        if isinstance(obj, Path) or (isinstance(obj, str) and not obj.lstrip().startswith("{")):
            obj = json.loads(Path(obj).read_text())
        elif isinstance(obj, str):
            obj = json.loads(obj)
        if obj.get("format") != "hpc_dfs.ClinicalPipeline/1":
            raise ValueError(f"not a clinical pipeline JSON (format={obj.get('format')!r})")
        pipe = cls()
        pipe.params = obj
        return pipe
