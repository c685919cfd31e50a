"""The cases to segment: discovered under ``--input``, shared out over ranks by voxel count, and their records."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_dfs import config as cfgmod, parallel
from hpc_dfs.contracts.kits import (CASE_RE, IMAGE_NAME, NNUNET_IMAGE_DIRS, case_name, case_suffix,
                                   is_nnunet_dataset, near_misses)
from hpc_dfs.inference.errors import PredictError
from hpc_dfs.log import get_logger

__all__ = ["CaseInput", "discover_inputs", "voxel_count", "voxel_counts", "partition", "load_records", "DUPLICATE"]

#: the key of the record that stands for a case listed twice in the clinical file (its message names the field)
DUPLICATE = "_listed_twice"


@dataclass
class CaseInput:
    """One image to segment: its case id, image path and the id used in output names."""

    case_id: str
    image_path: Path

    @property
    def suffix(self) -> str:
        """``case_00012`` -> ``00012`` (KiTS naming); any other id is used as it is."""
        return case_suffix(self.case_id)


def discover_inputs(path: str | Path) -> tuple[list[CaseInput], Path]:
    """Cases under ``path`` (sorted by id) and the folder where ``kits.json`` would be.

    ``path`` may be one ``imaging.nii.gz`` (or any ``.nii``/``.nii.gz``), a case folder holding
    ``imaging.nii.gz``, a folder of ``case_XXXXX`` folders, or an nnU-Net v2 raw dataset (its ``imagesTs/``
    when there is one, else its ``imagesTr/``; :func:`hpc_dfs.data.nnunet.read_raw_dataset`).

    Raises:
        ConfigError: ``path`` does not exist.
        PredictError: ``path`` is neither a NIfTI image nor a folder holding cases.
        hpc_dfs.data.nnunet.NnunetDatasetError: an nnU-Net dataset of more than one channel (names the file).
    """
    p = cfgmod.require_path(path, "any", "--input")
    if p.is_dir() and is_nnunet_dataset(p):
        from hpc_dfs.data.nnunet import read_raw_dataset
        folder = NNUNET_IMAGE_DIRS[1] if (p / NNUNET_IMAGE_DIRS[1]).is_dir() else NNUNET_IMAGE_DIRS[0]
        return [CaseInput(case_name(ref), ref) for ref in read_raw_dataset(p, folder).cases], p
    if p.is_file():
        if not (p.name.endswith(".nii.gz") or p.name.endswith(".nii")):
            raise PredictError(f"--input {p} is a file but not a NIfTI image (.nii or .nii.gz)")
        cid = p.parent.name if CASE_RE.match(p.parent.name) else case_name(p) if case_name(p) != p.name else \
            re.sub(r"\.nii(\.gz)?$", "", p.name)   # an nnU-Net image (imagesTs/NAME_0000.nii.gz) is case NAME
        return [CaseInput(cid, p)], (p.parent.parent if CASE_RE.match(p.parent.name) else p.parent)
    if (p / IMAGE_NAME).exists():
        return [CaseInput(p.name, p / IMAGE_NAME)], p.parent
    cases = [CaseInput(d.name, d / IMAGE_NAME) for d in sorted(p.iterdir()) if d.is_dir() and CASE_RE.match(d.name)]
    for _name, why in near_misses(p) if parallel.rank() == 0 else []:
        get_logger("hpc_dfs.predict").warning("--input %s: skipped %s", p, why)
    if not cases:
        raise PredictError(f"--input {p} holds no case_XXXXX/ folders and no {IMAGE_NAME}")
    return cases, p


def voxel_count(image_path: Path) -> int:
    """Voxels of an image from its header only (used to balance ranks); 0 when unreadable."""
    import nibabel as nib
    try:
        return int(np.prod(nib.load(str(image_path)).shape))
    except Exception:  # the case will fail later with a proper message
        return 0


def voxel_counts(cases: list[CaseInput], rank: int, world: int) -> dict[str, int]:
    """Voxels of every case by id: each rank reads the headers of every ``world``-th case, then they share them.

    A collective when ``world > 1`` (every rank calls it), so no rank reads every header.
    """
    own = {c.case_id: voxel_count(c.image_path) for c in cases[rank::world]}
    if world == 1:
        return own
    merged: dict[str, int] = {}
    for part in parallel.allgather_object(own, name="predict.voxel_counts"):
        merged.update(part)
    return merged


def partition(cases: list[CaseInput], rank: int, world: int, counts: dict[str, int] | None = None) -> list[CaseInput]:
    """This rank's cases, balanced by voxel count (hpc_dfs.data.reader.partition_balanced).

    Args:
        cases: every case, in the same order on every rank.
        rank: this rank.
        world: the number of ranks.
        counts: voxels by case id (:func:`voxel_counts`); read from the headers here without it.
    """
    from hpc_dfs.data.reader import partition_balanced
    if counts is None:
        counts = {c.case_id: voxel_count(c.image_path) for c in cases}
    items = [(c, counts[c.case_id]) for c in cases]
    mine = partition_balanced(items, rank, world)
    return sorted(mine, key=lambda c: c.case_id)


def load_records(clinical: Path | None, data_root: Path) -> tuple[dict[str, dict], Path | None]:
    """Clinical records by case id, from ``clinical`` (``--clinical``) or kits.json beside the cases (may be none).

    Raises:
        ConfigError: ``clinical`` is given but is not a file.
        PredictError: the records cannot be read.
    """
    from hpc_dfs.data.kits_clinical import duplicates, find_clinical_file, load_kits_records
    path = cfgmod.require_path(clinical, "file", "--clinical") if clinical else find_clinical_file(data_root)
    if path is None:
        return {}, None
    try:
        records = load_kits_records(path)
    except (OSError, ValueError) as e:
        raise PredictError(f"clinical records {path}: {e}") from None
    by_case = {str(r["case_id"]): r for r in records}
    by_case.update({cid: {"case_id": cid, DUPLICATE: msg} for cid, msg in duplicates(records).items()})
    return by_case, path
