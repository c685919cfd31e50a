"""The KiTS layout's names, in one place (``hpc_dfs/CONTRACTS.md`` sections 1 and 4).

    DATA/case_XXXXX/imaging.nii.gz             CT                      IMAGE_NAME
    DATA/case_XXXXX/segmentation.nii.gz        ground truth            LABEL_NAME (KiTS21: LABEL_FILES[1])
    PRED/prediction_XXXXX.nii.gz               predicted class map     prediction_name(case_id), PRED_RE

A case id is ``case_`` and five digits (:data:`CASE_RE`, whose group 1 is the digits); a prediction
carries the same five digits. This module imports nothing heavy, so any stage may use it.
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["CASE_RE", "IMAGE_NAME", "LABEL_NAME", "LABEL_FILES", "PRED_RE", "prediction_name", "near_miss",
           "near_misses"]

#: a case folder name; ``CASE_RE.match("case_00012").group(1) == "00012"``. ASCII digits only (``\d`` would take
#: Arabic-Indic and other Unicode digits), and nothing after them (``$`` would take a trailing newline)
CASE_RE = re.compile(r"^case_([0-9]{5})\Z")
#: a name that is almost a case folder (a space, another case, other digits, other separators): reported
_NEAR_CASE = re.compile(r"^\s*case[\s_-]*\d+\s*$", re.IGNORECASE)
IMAGE_NAME = "imaging.nii.gz"
LABEL_NAME = "segmentation.nii.gz"
#: ground-truth file names looked for in a case folder, in order (KiTS19/23, then KiTS21's majority vote)
LABEL_FILES = (LABEL_NAME, "aggregated_MAJ_seg.nii.gz")
#: a prediction file name; group 1 is the case's five digits
PRED_RE = re.compile(r"^prediction_([0-9]{5})\.nii(\.gz)?\Z")


def prediction_name(case_id: str) -> str:
    """``case_00012`` -> ``prediction_00012.nii.gz``; an id outside the KiTS pattern is used as it is.

    Args:
        case_id: the case folder name.
    """
    m = CASE_RE.match(case_id)
    return f"prediction_{m.group(1) if m else case_id}.nii.gz"


def near_miss(name: str) -> str | None:
    """Why ``name`` is almost, but not, a case folder name (then it is reported, not skipped silently), or None.

    Args:
        name: a folder name in a data folder.

    Returns:
        ``"'case_00001 ' is not a case id (case_ and 5 ASCII digits): it ends with a space"``, or None for a
        case id or a name that is nothing like one.
    """
    if CASE_RE.match(name) or not _NEAR_CASE.match(name):
        return None
    if name != name.strip():
        why = "it starts or ends with white space"
    elif not name.startswith("case_"):
        why = "it does not start with 'case_' exactly"
    elif any(c.isdigit() and not c.isascii() for c in name):
        why = "its digits are not ASCII digits 0-9"
    else:
        why = "it is not 'case_' and five digits"
    return f"{name!r} is not a case id (case_ and 5 ASCII digits): {why}"


def near_misses(data_dir: str | Path) -> list[tuple[str, str]]:
    """``(folder name, why)`` of the folders of ``data_dir`` that are almost case folders (``'case_00001 '``, other
    digits): a stage reports them as errors rather than skip them without a word.

    Args:
        data_dir: the KiTS-layout folder (need not exist).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    return [(p.name, why) for p in sorted(data_dir.iterdir()) if p.is_dir() and (why := near_miss(p.name))]
