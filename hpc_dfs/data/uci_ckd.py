"""Tolerant loader for the UCI Chronic Kidney Disease data set (ARFF or CSV).

The UCI files (``chronic_kidney_disease.arff``, ``chronic_kidney_disease_full.arff``) and the
widely used Kaggle-style ``kidney_disease.csv`` carry quirks that strict readers reject or, worse,
silently misread (see ``shared/data/uci_ckd/SOURCE.md``):

- stray tabs and spaces around values (``"\\t?"``, ``" yes"``, ``"ckd\\t"``);
- one row with a double comma (``...,4.8,no,,no,no,good,...``) that has 26 fields, so a naive
  parser shifts every later value and reads the class as ``"no"``;
- two rows in the ``_full`` ARFF that end in a trailing comma;
- the ARFF calls two columns ``wbcc``/``rbcc`` where the CSV and the info file say ``wc``/``rc``;
- the CSV has an ``id`` column and calls the label ``classification``; missing is ``?`` or empty.

``scipy.io.arff.loadarff`` fails on both ARFFs (``" yes value not in ('yes','no')"``) and
``pandas.read_csv`` reads the tab-polluted numeric columns as strings, which is why the small
ARFF reader below is hand-written: it strips every token, drops only *empty* surplus fields (never
a real value), checks every value against the declared type and fails with one message naming
the file, line and column otherwise.

Usage::

    from hpc_dfs.data.uci_ckd import load_uci_ckd, FEATURES
    frame = load_uci_ckd("chronic_kidney_disease_full.arff")
    X, y = frame[list(FEATURES)], frame["ckd"]

The returned frame is indexed by ``id`` (the 0-based data-row number; the CSV's own ``id``
column, which follows the same order), has the 24 canonical feature columns of
:data:`FEATURES` and a 0/1 target column ``ckd`` (1 = chronic kidney disease).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from hpc_dfs.errors import EXIT_DATA, HpcDfsError
from hpc_dfs.log import get_logger

__all__ = ["UCICKDError", "FEATURES", "NUMERIC", "ORDINAL", "NOMINAL_LEVELS", "TARGET",
           "load_uci_ckd", "parse_arff", "read_csv_tolerant"]

log = get_logger(__name__)

TARGET = "ckd"
"""Name of the 0/1 target column (1 = ckd, 0 = notckd)."""

NUMERIC: tuple[str, ...] = ("age", "bp", "bgr", "bu", "sc", "sod", "pot", "hemo", "pcv", "wc", "rc")
"""The 11 continuous measurements."""

ORDINAL: dict[str, tuple[float, ...]] = {
    "sg": (1.005, 1.010, 1.015, 1.020, 1.025),   # specific gravity
    "al": (0, 1, 2, 3, 4, 5),                    # albumin grade
    "su": (0, 1, 2, 3, 4, 5),                    # sugar grade
}
"""Columns the ARFF declares nominal but which are graded scales; kept as numbers (one feature each)."""

NOMINAL_LEVELS: dict[str, tuple[str, str]] = {
    "rbc": ("normal", "abnormal"), "pc": ("normal", "abnormal"),
    "pcc": ("notpresent", "present"), "ba": ("notpresent", "present"),
    "htn": ("no", "yes"), "dm": ("no", "yes"), "cad": ("no", "yes"),
    "appet": ("good", "poor"), "pe": ("no", "yes"), "ane": ("no", "yes"),
}
"""Binary nominal columns as (reference level, risk level); an encoder maps the risk level to 1."""

FEATURES: tuple[str, ...] = ("age", "bp", "sg", "al", "su", "rbc", "pc", "pcc", "ba", "bgr", "bu", "sc",
                             "sod", "pot", "hemo", "pcv", "wc", "rc", "htn", "dm", "cad", "appet", "pe",
                             "ane")
"""The 24 features in the order of the UCI files (the order the Clinical-GRU reads them)."""

ALIASES = {"wbcc": "wc", "rbcc": "rc", "class": TARGET, "classification": TARGET}
"""Source column name -> canonical name."""

CLASS_VALUES = {"ckd": 1, "notckd": 0}
MISSING = {"", "?"}


class UCICKDError(HpcDfsError, ValueError):
    """The file cannot be read as UCI CKD; the message names the file, line/column and problem (exit code 3)."""

    code = EXIT_DATA


# ----------------------------------------------------------------------------- ARFF
_ATTR_RE = re.compile(r"""^@attribute\s+(?:'([^']*)'|"([^"]*)"|(\S+))\s+(.*)$""", re.IGNORECASE)


def _unquote(token: str) -> str:
    token = token.strip()
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        token = token[1:-1].strip()
    return token


def _fix_field_count(tokens: list[str], n: int, where: str) -> list[str]:
    """Return ``tokens`` with exactly ``n`` fields, dropping only empty surplus fields.

    A trailing comma or a doubled comma gives empty tokens that stand for no value (the ARFF
    writes missing values as ``?``), so removing exactly the surplus number of empty tokens
    recovers the row. Anything else (too few fields, or surplus non-empty fields) is an error.
    """
    if len(tokens) == n:
        return tokens
    surplus = len(tokens) - n
    empties = [i for i, t in enumerate(tokens) if t == ""]
    if surplus < 0 or len(empties) < surplus:
        raise UCICKDError(f"{where}: expected {n} comma-separated values, found {len(tokens)}")
    # drop trailing empties first (trailing comma), then the remaining empties from the right
    drop = set(empties[-surplus:])
    log.debug("%s: dropped %d empty surplus field(s)", where, surplus)
    return [t for i, t in enumerate(tokens) if i not in drop]


def parse_arff(path: str | Path) -> pd.DataFrame:
    """Read a dense ARFF file tolerantly into a frame of stripped strings (``None`` = missing).

    Header names are kept as written (``wbcc`` stays ``wbcc``); use :func:`load_uci_ckd` for the
    canonical, typed UCI CKD frame. Values are not type-checked here.

    Raises:
        UCICKDError: no ``@attribute``/``@data`` section, sparse data, or a row whose field count
            cannot be repaired. The message names the file and line.
    """
    path = Path(path)
    names: list[str] = []
    rows: list[list[str | None]] = []
    lines: list[int] = []
    repaired: list[int] = []
    in_data = False
    text = path.read_text(encoding="utf-8", errors="replace")
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        if not in_data:
            low = line.lower()
            if low.startswith("@attribute"):
                m = _ATTR_RE.match(line)
                if not m:
                    raise UCICKDError(f"{path}:{lineno}: cannot read attribute line {line!r}")
                names.append((m.group(1) or m.group(2) or m.group(3)).strip())
            elif low.startswith("@data"):
                in_data = True
            continue
        if line.startswith("{"):
            raise UCICKDError(f"{path}:{lineno}: sparse ARFF rows are not supported")
        tokens = [_unquote(t) for t in line.split(",")]
        if len(tokens) != len(names):
            repaired.append(lineno)
        tokens = _fix_field_count(tokens, len(names), f"{path}:{lineno}")
        rows.append([None if t in MISSING else t for t in tokens])
        lines.append(lineno)
    if not names:
        raise UCICKDError(f"{path}: no @attribute lines; is this an ARFF file?")
    if not in_data:
        raise UCICKDError(f"{path}: no @data section")
    frame = pd.DataFrame(rows, columns=names, dtype=object)
    frame.attrs.update(source_lines=lines, repaired_rows=repaired)
    return frame


# ----------------------------------------------------------------------------- CSV
def read_csv_tolerant(path: str | Path) -> pd.DataFrame:
    """Read a CSV as stripped strings (``None`` = missing: empty or ``?``), repairing surplus commas.

    Raises:
        UCICKDError: empty file or a row whose field count cannot be repaired.
    """
    import csv

    path = Path(path)
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise UCICKDError(f"{path}: the file is empty") from None
        rows, lines, repaired = [], [], []
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                repaired.append(reader.line_num)
            tokens = _fix_field_count([c.strip() for c in row], len(header), f"{path}:{reader.line_num}")
            rows.append([None if t in MISSING else t for t in tokens])
            lines.append(reader.line_num)
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    frame.attrs.update(source_lines=lines, repaired_rows=repaired)
    return frame


# ----------------------------------------------------------------------------- canonical frame
def _to_float(value: str | None, where: str) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise UCICKDError(f"{where}: {value!r} is not a number") from None


def load_uci_ckd(path: str | Path) -> pd.DataFrame:
    """Load UCI CKD from an ``.arff`` or ``.csv`` file into the canonical typed frame.

    Args:
        path: ``chronic_kidney_disease[_full].arff`` or ``kidney_disease.csv`` (any file with the
            same columns; ``wbcc``/``rbcc`` or ``wc``/``rc``; label ``class`` or ``classification``).

    Returns:
        DataFrame indexed by ``id`` with the :data:`FEATURES` columns (numeric and ordinal as
        float; binary nominal as object columns holding the level strings of
        :data:`NOMINAL_LEVELS`; NaN = missing everywhere) and the int target ``ckd`` (1 = ckd).
        ``frame.attrs`` holds ``source``, ``format`` and ``repaired_rows`` (source line numbers whose
        field count was repaired).

    Raises:
        UCICKDError: missing file, unknown suffix, missing columns, an unknown value in a column,
            or a row without a class. The message names the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise UCICKDError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".arff":
        raw = parse_arff(path)
    elif suffix == ".csv":
        raw = read_csv_tolerant(path)
    else:
        raise UCICKDError(f"{path}: unknown format {suffix or '(no suffix)'!r}; expected .arff or .csv")
    lines = raw.attrs.get("source_lines", list(range(len(raw))))
    repaired = raw.attrs.get("repaired_rows", [])
    raw = raw.rename(columns={c: ALIASES.get(c.strip().lower(), c.strip().lower()) for c in raw.columns})
    if TARGET not in raw.columns:
        raise UCICKDError(f"{path}: no target column (looked for 'class' or 'classification'); "
                          f"columns are {list(raw.columns)}")
    missing = [c for c in FEATURES if c not in raw.columns]
    if missing:
        raise UCICKDError(f"{path}: missing UCI CKD column(s) {missing}; columns are {list(raw.columns)}")

    if "id" in raw.columns:
        ids = [int(_to_float(v, f"{path}:{ln}: column 'id'")) for v, ln in zip(raw["id"], lines)]
    else:
        ids = list(range(len(raw)))
    out: dict[str, list] = {}
    for col in FEATURES:
        values = raw[col].tolist()
        if col in NOMINAL_LEVELS:
            levels = NOMINAL_LEVELS[col]
            for v, ln in zip(values, lines):
                if v is not None and v not in levels:
                    raise UCICKDError(f"{path}:{ln}: column '{col}' has {v!r}, expected one of {levels}")
            out[col] = [math.nan if v is None else v for v in values]
        else:
            nums = [_to_float(v, f"{path}:{ln}: column '{col}'") for v, ln in zip(values, lines)]
            if col in ORDINAL:
                allowed = ORDINAL[col]
                for x, ln in zip(nums, lines):
                    if not math.isnan(x) and not any(abs(x - a) < 1e-9 for a in allowed):
                        raise UCICKDError(f"{path}:{ln}: column '{col}' has {x}, expected one of {allowed}")
            out[col] = nums
    target = []
    for v, ln in zip(raw[TARGET].tolist(), lines):
        if v not in CLASS_VALUES:
            raise UCICKDError(f"{path}:{ln}: class is {v!r}, expected 'ckd' or 'notckd'")
        target.append(CLASS_VALUES[v])
    index = pd.Index(ids, name="id")
    # nominal columns stay plain object (NaN = missing): sklearn's imputers and encoders expect it
    frame = pd.DataFrame({c: pd.Series(v, index=index, dtype=object if c in NOMINAL_LEVELS else float)
                          for c, v in out.items()}, index=index)
    frame[TARGET] = pd.Series(target, index=frame.index, dtype=int)
    if frame.index.has_duplicates:
        raise UCICKDError(f"{path}: duplicate ids {frame.index[frame.index.duplicated()].tolist()[:5]}")
    frame.attrs.update(source=str(path), format=suffix[1:], repaired_rows=list(repaired))
    if repaired:
        log.info("%s: repaired the field count of %d row(s) (empty surplus fields) at line(s) %s",
                 path, len(repaired), repaired)
    return frame
