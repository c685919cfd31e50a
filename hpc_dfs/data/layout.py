"""The KiTS layout's names, in one place (``hpc_dfs/CONTRACTS.md`` sections 1 and 4).

    DATA/case_XXXXX/imaging.nii.gz             CT                      IMAGE_NAME
    DATA/case_XXXXX/segmentation.nii.gz        ground truth            LABEL_NAME (KiTS21: LABEL_FILES[1])
    PRED/prediction_XXXXX.nii.gz               predicted class map     prediction_name(case_id), PRED_RE

A case id is ``case_`` and five digits (:data:`CASE_RE`, whose group 1 is the digits); a prediction
carries the same five digits. This module imports nothing heavy, so any stage may use it.
"""
from __future__ import annotations

import re

__all__ = ["CASE_RE", "IMAGE_NAME", "LABEL_NAME", "LABEL_FILES", "PRED_RE", "prediction_name"]

#: a case folder name; ``CASE_RE.match("case_00012").group(1) == "00012"``
CASE_RE = re.compile(r"^case_(\d{5})$")
IMAGE_NAME = "imaging.nii.gz"
LABEL_NAME = "segmentation.nii.gz"
#: ground-truth file names looked for in a case folder, in order (KiTS19/23, then KiTS21's majority vote)
LABEL_FILES = (LABEL_NAME, "aggregated_MAJ_seg.nii.gz")
#: a prediction file name; group 1 is the case's five digits
PRED_RE = re.compile(r"^prediction_(\d{5})\.nii(\.gz)?$")


def prediction_name(case_id: str) -> str:
    """``case_00012`` -> ``prediction_00012.nii.gz``; an id outside the KiTS pattern is used as it is.

    Args:
        case_id: the case folder name.
    """
    m = CASE_RE.match(case_id)
    return f"prediction_{m.group(1) if m else case_id}.nii.gz"
