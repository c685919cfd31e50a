"""The KiTS layout's names and the ground-truth lookup, in one place (``hpc_dfs/CONTRACTS.md`` sections 1 and 4).

    DATA/kits.json                             clinical records        CLINICAL_NAME
    DATA/case_XXXXX/imaging.nii.gz             CT                      IMAGE_NAME
    DATA/case_XXXXX/segmentation.nii.gz        ground truth            LABEL_NAME (KiTS21: LABEL_FILES[1])
    PRED/prediction_XXXXX.nii.gz               predicted class map     prediction_name(case_id), PRED_RE

A case id is ``case_`` and five digits (:data:`CASE_RE`, whose group 1 is the digits); a prediction
carries the same five digits. :func:`find_label_file` is the one ground-truth lookup (preprocess, predict's
overlays, evaluate and report). This module imports nothing heavy, so any stage may use it.

An nnU-Net v2 raw dataset is read as it is (``CONTRACTS.md`` section 6)::

    DATA/dataset.json                          channels, labels, file ending          NNUNET_DATASET_NAME
    DATA/imagesTr/NAME_0000.nii.gz             CT (channel 0000)                      NNUNET_IMAGE_DIRS[0]
    DATA/labelsTr/NAME.nii.gz                  ground truth                           NNUNET_LABEL_DIR
    DATA/imagesTs/NAME_0000.nii.gz             CT to predict                          NNUNET_IMAGE_DIRS[1]

There a case is named by its image file instead of a folder: :func:`case_image`, :func:`case_name` and
:func:`find_label_file` take either (a "case reference"), so the stages need not know which layout they read.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

__all__ = ["CASE_RE", "IMAGE_NAME", "LABEL_NAME", "LABEL_FILES", "EVAL_LABEL_FILES", "KITS21_LABEL_NAME",
           "CLINICAL_NAME", "KITS23_CLINICAL_NAME", "CLINICAL_FILES", "PRED_RE", "SUBMISSION_RE", "submission_name",
           "case_suffix", "prediction_name", "find_label_file", "near_miss", "near_misses", "NNUNET_DATASET_NAME",
           "NNUNET_IMAGE_DIRS", "NNUNET_LABEL_DIR", "NNUNET_IMAGE_RE", "is_nnunet_dataset", "nnunet_images",
           "case_image", "case_name"]

#: a case folder name; ``CASE_RE.match("case_00012").group(1) == "00012"``. ASCII digits only (``\d`` would take
#: Arabic-Indic and other Unicode digits), and nothing after them (``$`` would take a trailing newline)
CASE_RE = re.compile(r"^case_([0-9]{5})\Z")
#: a name that is almost a case folder (a space, another case, other digits, other separators): reported
_NEAR_CASE = re.compile(r"^\s*case[\s_-]*\d+\s*$", re.IGNORECASE)
IMAGE_NAME = "imaging.nii.gz"
LABEL_NAME = "segmentation.nii.gz"
#: KiTS21's majority-vote ground truth
KITS21_LABEL_NAME = "aggregated_MAJ_seg.nii.gz"
#: ground-truth file names looked for in a case folder, in order (KiTS19/23, then KiTS21's majority vote)
LABEL_FILES = (LABEL_NAME, KITS21_LABEL_NAME)
#: what ``evaluate`` also accepts as ground truth: an uncompressed segmentation after the two above
EVAL_LABEL_FILES = LABEL_FILES + ("segmentation.nii",)
#: the clinical records beside the cases (KiTS19 schema; ``synth`` writes it), and KiTS23's renamed file
CLINICAL_NAME = "kits.json"
KITS23_CLINICAL_NAME = "kits23.json"
#: clinical files looked for in a data folder, in order (a CSV of the same fields last)
CLINICAL_FILES = (CLINICAL_NAME, KITS23_CLINICAL_NAME, "clinical.csv")
#: an nnU-Net v2 raw dataset: its description, image folders (training, test) and label folder
NNUNET_DATASET_NAME = "dataset.json"
NNUNET_IMAGE_DIRS = ("imagesTr", "imagesTs")
NNUNET_LABEL_DIR = "labelsTr"
#: an nnU-Net image file: the case identifier, its four-digit channel, the file ending
NNUNET_IMAGE_RE = re.compile(r"^(.+)_([0-9]{4})(\.nii\.gz|\.nii)\Z")
#: a prediction file name; group 1 is the case's five digits
PRED_RE = re.compile(r"^prediction_([0-9]{5})\.nii(\.gz)?\Z")


def case_suffix(case_id: str) -> str:
    """``case_00012`` -> ``00012`` (KiTS naming); any other id is returned as it is.

    Args:
        case_id: the case folder name.
    """
    m = CASE_RE.match(case_id)
    return m.group(1) if m else case_id


def prediction_name(case_id: str) -> str:
    """``case_00012`` -> ``prediction_00012.nii.gz``; an id outside the KiTS pattern is used as it is.

    Args:
        case_id: the case folder name.
    """
    return f"prediction_{case_suffix(case_id)}.nii.gz"


#: the KiTS challenge's submission naming, which nnU-Net's KiTS datasets also give their predictions
SUBMISSION_RE = re.compile(r"^case_(\d{5})\.nii\.gz$")


def submission_name(case_id: str) -> str:
    """``case_00012`` -> ``case_00012.nii.gz`` (the challenge's and nnU-Net's prediction name).

    Args:
        case_id: the case folder name.
    """
    return f"case_{case_suffix(case_id)}.nii.gz"


def is_nnunet_dataset(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` is an nnU-Net v2 raw dataset: ``dataset.json`` beside ``imagesTr/`` or ``imagesTs/``.

    Args:
        data_dir: a data folder.
    """
    data_dir = Path(data_dir)
    return (data_dir / NNUNET_DATASET_NAME).is_file() and any((data_dir / d).is_dir() for d in NNUNET_IMAGE_DIRS)


def _nnunet_image(case: Path) -> Optional[re.Match]:
    """The name match of an nnU-Net image file (in ``imagesTr``/``imagesTs``), else None (a KiTS case folder)."""
    return NNUNET_IMAGE_RE.match(case.name) if case.parent.name in NNUNET_IMAGE_DIRS else None


def nnunet_images(data_dir: str | Path, folder: str = NNUNET_IMAGE_DIRS[0]) -> dict[str, list[Path]]:
    """The image files of an nnU-Net dataset's ``folder``, by case identifier, each case's channels in order.

    Args:
        data_dir: the dataset folder (``DatasetNNN_NAME``).
        folder: ``imagesTr`` or ``imagesTs``.
    """
    out: dict[str, list[Path]] = {}
    root = Path(data_dir) / folder
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        m = NNUNET_IMAGE_RE.match(p.name)
        if m and p.is_file():
            out.setdefault(m.group(1), []).append(p)
    return out


def case_image(case: Path) -> Path:
    """The CT of a case reference: ``DATA/case_XXXXX`` -> its ``imaging.nii.gz``; an nnU-Net image file itself.

    Args:
        case: a KiTS case folder or an nnU-Net ``imagesTr/NAME_0000.nii.gz``.
    """
    return case if _nnunet_image(case) else case / IMAGE_NAME


def case_name(case: Path) -> str:
    """The case id of a case reference: the KiTS folder's name, or the nnU-Net identifier (``NAME``).

    Args:
        case: a KiTS case folder or an nnU-Net ``imagesTr/NAME_0000.nii.gz``.
    """
    m = _nnunet_image(case)
    return m.group(1) if m else case.name


def find_label_file(case_dir: Path, names: tuple[str, ...] = LABEL_FILES) -> Optional[Path]:
    """The case's ground-truth file: the first of ``names`` present in ``case_dir``, else None. For an nnU-Net
    image file (``imagesTr/NAME_0000.nii.gz``) it is ``labelsTr/NAME`` with the image's file ending.

    Args:
        case_dir: ``DATA/case_XXXXX``, or an nnU-Net image file.
        names: the file names to try, in order (:data:`LABEL_FILES`; evaluate passes :data:`EVAL_LABEL_FILES`).
    """
    m = _nnunet_image(case_dir)
    if m:
        label = case_dir.parent.parent / NNUNET_LABEL_DIR / f"{m.group(1)}{m.group(3)}"
        return label if label.exists() else None
    for name in names:
        if (case_dir / name).exists():
            return case_dir / name
    return None


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
