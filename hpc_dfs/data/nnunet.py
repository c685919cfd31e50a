"""nnU-Net v2 raw datasets written from KiTS-layout data (``hpc-dfs export-nnunet``), and their names.

    from hpc_dfs.data.nnunet import plan_export, write_export
    plan = plan_export("data/kits23", "nnUNet_raw/Dataset220_KiTS2023", shards_dir="data/shards")
    write_export(plan)

The dataset (nnU-Net v2's ``documentation/dataset_format.md``)::

    OUT = nnUNet_raw/DatasetNNN_NAME          NNN: three digits (the -d of nnU-Net's commands), NAME: the name
    OUT/imagesTr/case_XXXXX_0000.nii.gz       the CT, channel 0000 (byte for byte the case's imaging.nii.gz)
    OUT/labelsTr/case_XXXXX.nii.gz            the ground truth (byte for byte its segmentation.nii.gz)
    OUT/dataset.json                          channels, labels, numTraining, file_ending, ...
    OUT/splits_final.json                     with a shards folder: the manifest's folds, as nnU-Net's
                                              [{"train": [...], "val": [...]}, ...]; nnU-Net reads it from
                                              nnUNet_preprocessed/DatasetNNN_NAME/ (copy it there after planning)

The case identifier is the KiTS case id, as in nnU-Net's own KiTS conversions, so an nnU-Net prediction
``case_XXXXX.nii.gz`` is the challenge's submission naming, which ``hpc_dfs.metrics.kits23`` scores as it is.

Labels. KiTS23 data (a label map holding 3, cyst; KiTS21's too) gets the regions of nnU-Net's own KiTS23
conversion (``nnunetv2/dataset_conversion/Dataset220_KiTS2023.py``): ``{"background": 0, "kidney": [1, 2, 3],
"masses": [2, 3], "tumor": 2}`` with ``regions_class_order`` ``[1, 3, 2]`` (kidney, then cyst, then tumour
when the sigmoid regions are turned back into labels, as the official KiTS23 code builds them). KiTS19 data
gets the plain labels ``{"background": 0, "kidney": 1, "tumor": 2}``. Both use ``NibabelIOWithReorient``,
as that conversion does.

Reading (:func:`read_raw_dataset`): ``preprocess`` and ``predict`` take such a folder as they take the KiTS
layout. Its ``dataset.json`` must describe one channel; its labels map to ours by name (``background``,
``kidney``, ``tumor``/``tumour``, ``cyst``), or are exactly KiTS23's regions above (then the raw values are
KiTS23's: 0-3). Another name, other regions or a second channel is one error naming ``dataset.json``.

Writing is planned first and done second: :func:`plan_export` reads every label map (values must lie in
0-3; a case without CT or ground truth is an error naming it) and compares what it would write with what
``OUT`` already holds, so a refusal (another dataset there, a file that differs) leaves ``OUT`` untouched.
:func:`write_export` copies each file atomically (temp name, fsync, rename) and keeps an identical one.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hpc_dfs import fsutil
from hpc_dfs.data.kits_io import CLASSES, find_label_file, list_cases, load_nifti
from hpc_dfs.contracts.kits import IMAGE_NAME, NNUNET_DATASET_NAME, NNUNET_IMAGE_DIRS, nnunet_images
from hpc_dfs.contracts.shards import MANIFEST_NAME
from hpc_dfs.errors import EXIT_DATA, EXIT_USAGE, HpcDfsError

__all__ = ["NnunetExportError", "DATASET_DIR_RE", "FILE_ENDING", "KITS23_LABELS", "KITS23_REGIONS_CLASS_ORDER",
           "KITS19_LABELS", "image_name", "label_name", "parse_dataset_dir", "dataset_json", "splits_from_shards",
           "ExportPlan", "plan_export", "write_export", "NnunetDatasetError", "RawDataset", "read_raw_dataset"]

#: an nnU-Net dataset folder: ``Dataset`` + three digits + ``_`` + a name
DATASET_DIR_RE = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9][A-Za-z0-9_.\-]*)$")
FILE_ENDING = ".nii.gz"
KITS23_LABELS = {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
KITS23_REGIONS_CLASS_ORDER = [1, 3, 2]
KITS19_LABELS = {"background": 0, "kidney": 1, "tumor": 2}
READER = "NibabelIOWithReorient"
SPLITS_NAME = "splits_final.json"


class NnunetExportError(HpcDfsError):
    """An export that cannot be made: a bad ``--out`` name (code 2), a case or file that cannot be used (3)."""

    code = EXIT_DATA


def image_name(case_id: str, channel: int = 0) -> str:
    """``case_00002`` -> ``case_00002_0000.nii.gz`` (``imagesTr``)."""
    return f"{case_id}_{channel:04d}{FILE_ENDING}"


def label_name(case_id: str) -> str:
    """``case_00002`` -> ``case_00002.nii.gz`` (``labelsTr``)."""
    return f"{case_id}{FILE_ENDING}"


def parse_dataset_dir(out: str | Path) -> tuple[int, str]:
    """(dataset id, name) of an nnU-Net dataset folder ``DatasetNNN_NAME``.

    Raises:
        NnunetExportError: the folder's name does not follow nnU-Net's pattern (exit 2).
    """
    m = DATASET_DIR_RE.match(Path(out).name)
    if not m:
        raise NnunetExportError(f"--out {out}: the folder must be named DatasetNNN_NAME (three digits, then a name, "
                                "e.g. nnUNet_raw/Dataset220_KiTS2023), as nnU-Net finds datasets by it",
                                code=EXIT_USAGE)
    return int(m.group(1)), m.group(2)


def dataset_json(kits23: bool, n_training: int, name: str, source: str) -> dict[str, Any]:
    """The ``dataset.json`` of an export: KiTS23 regions or KiTS19 labels (module docstring).

    Args:
        kits23: the data holds cysts (label 3): regions; else plain labels.
        n_training: number of cases in ``imagesTr``.
        name: the dataset's name (``DatasetNNN_NAME``'s NAME).
        source: where the data came from (written as the description).
    """
    from hpc_dfs import __version__

    out: dict[str, Any] = {"channel_names": {"0": "CT"},
                           "labels": dict(KITS23_LABELS if kits23 else KITS19_LABELS)}
    if kits23:
        out["regions_class_order"] = list(KITS23_REGIONS_CLASS_ORDER)
    out.update({"numTraining": int(n_training), "file_ending": FILE_ENDING, "name": name,
                "description": f"{'KiTS23' if kits23 else 'KiTS19'}-layout data from {source}",
                "overwrite_image_reader_writer": READER, "converted_by": f"hpc-dfs {__version__} export-nnunet"})
    return out


def splits_from_shards(shards_dir: str | Path, case_ids: list[str]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` content from the manifest's folds: one ``{"train", "val"}`` per fold.

    Args:
        shards_dir: a folder written by ``hpc-dfs preprocess`` (its manifest is read through
            :class:`hpc_dfs.data.reader.ShardSet`).
        case_ids: the cases of the export; every manifest case must be one of them.

    Raises:
        NnunetExportError: the manifest lists a case that is not exported (nnU-Net would fail on it).
        hpc_dfs.data.shards.ShardError: the manifest is missing or unreadable.
    """
    from hpc_dfs.data.reader import ShardSet

    shards = ShardSet(shards_dir)
    absent = [c for c in shards.case_ids if c not in set(case_ids)]
    if absent:
        raise NnunetExportError(f"{Path(shards_dir) / MANIFEST_NAME} lists {len(absent)} case(s) that the data "
                                f"folder does not hold: {', '.join(absent[:5])}")
    return [dict(zip(("train", "val"), shards.split(f))) for f in range(int(shards.manifest["n_folds"]))]


@dataclass
class ExportPlan:
    """What :func:`write_export` will write: files (source -> target), ``dataset.json`` and the splits."""

    out: Path
    kits23: bool
    case_ids: list[str]
    files: list[tuple[Path, Path]] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)
    splits: Optional[list[dict[str, list[str]]]] = None
    unsplit: list[str] = field(default_factory=list)  # exported cases that the manifest leaves out


def _has_cyst(case_id: str, path: Path) -> bool:
    """Whether a label map holds 3 (cyst); raises for values outside 0-3, naming the case and file."""
    arr, _, _ = load_nifti(path, case_id)
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
        raise NnunetExportError(f"[{case_id}] {path}: label map holds non-integer values")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0 or hi > 3:
        raise NnunetExportError(f"[{case_id}] {path}: label value {int(lo if lo < 0 else hi)} outside 0-3 "
                                "(0 background, 1 kidney, 2 tumour, 3 cyst)")
    return bool(hi >= 3 and np.any(arr == 3))


def _case_files(data_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case id, CT, ground truth) of every case; a case without either is an error naming it."""
    try:
        cases = list_cases(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise NnunetExportError(f"--data: {e}", code=EXIT_USAGE) from None
    out = []
    for d in cases:
        image, label = d / IMAGE_NAME, find_label_file(d)
        if not image.is_file():
            raise NnunetExportError(f"[{d.name}] no {IMAGE_NAME} in {d}: nnU-Net's imagesTr needs the CT of every case")
        if label is None:
            raise NnunetExportError(f"[{d.name}] no ground truth in {d}: nnU-Net's labelsTr needs one for every case")
        out.append((d.name, image, label))
    return out


def _same_file(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and fsutil.sha256_file(a) == fsutil.sha256_file(b)


def _comparable(obj: Any) -> Any:
    """A JSON document without the keys that only inform (where the data came from, which hpc-dfs wrote it)."""
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if k not in ("description", "converted_by")}
    return obj


def _check_existing(plan: ExportPlan) -> None:
    """Refuse an ``OUT`` that holds another dataset: a file that differs, or files this export would not write."""
    out = plan.out
    if out.exists() and not out.is_dir():
        raise NnunetExportError(f"--out {out} is a file", code=EXIT_USAGE)
    targets = {t: s for s, t in plan.files}
    for sub in ("imagesTr", "labelsTr"):
        for p in sorted((out / sub).glob("*")) if (out / sub).is_dir() else []:
            if p.name.startswith(fsutil.TMP_PREFIX):
                continue
            if p not in targets:
                raise NnunetExportError(f"{p} exists and is not part of this export: {out} holds another dataset "
                                        "(choose another --out, or remove it)", code=EXIT_USAGE)
            if not _same_file(p, targets[p]):
                raise NnunetExportError(f"{p} exists and differs from {targets[p]}: {out} holds another dataset "
                                        "(choose another --out, or remove it)", code=EXIT_USAGE)
    for name, want in ((NNUNET_DATASET_NAME, plan.dataset), (SPLITS_NAME, plan.splits)):
        p = out / name
        if want is not None and p.is_file():
            try:
                have = json.loads(p.read_text())
            except ValueError:
                have = None
            if _comparable(have) != _comparable(json.loads(json.dumps(want))):
                raise NnunetExportError(f"{p} exists and differs from this export's: {out} holds another dataset "
                                        "(choose another --out, or remove it)", code=EXIT_USAGE)


def plan_export(data_dir: str | Path, out: str | Path, shards_dir: str | Path | None = None,
                labels: str = "auto") -> ExportPlan:
    """Everything an export will write, checked against the data and against ``out`` (nothing is written).

    Args:
        data_dir: KiTS-layout folder (``case_XXXXX/imaging.nii.gz`` and ``segmentation.nii.gz``).
        out: ``nnUNet_raw/DatasetNNN_NAME``.
        shards_dir: a ``preprocess`` output whose manifest's folds become ``splits_final.json``.
        labels: ``"auto"`` (KiTS23 regions when a label map holds 3), ``"kits23"`` or ``"kits19"``.

    Raises:
        NnunetExportError: a bad ``out`` name, ``labels`` value or data folder (exit 2); a case without CT or
            ground truth, or with labels outside 0-3 (or 3 under ``labels="kits19"``) (exit 3); ``out``
            holding another dataset (exit 2).
        hpc_dfs.data.kits_io.CaseError: a label map that cannot be read (names the case).
    """
    out = Path(out)
    _, name = parse_dataset_dir(out)
    if labels not in ("auto", "kits23", "kits19"):
        raise NnunetExportError(f"--labels {labels!r}: expected auto, kits23 or kits19", code=EXIT_USAGE)
    cases = _case_files(Path(data_dir))
    cysts = [cid for cid, _, lab in cases if _has_cyst(cid, lab)]
    if labels == "kits19" and cysts:
        raise NnunetExportError(f"[{cysts[0]}] holds label 3 (cyst), which KiTS19 labels do not have: use "
                                "--labels kits23 (or auto)")
    ids = [cid for cid, _, _ in cases]
    plan = ExportPlan(out=out, kits23=labels == "kits23" or (labels == "auto" and bool(cysts)), case_ids=ids)
    for cid, image, label in cases:
        plan.files += [(image, out / "imagesTr" / image_name(cid)), (label, out / "labelsTr" / label_name(cid))]
    plan.dataset = dataset_json(plan.kits23, len(ids), name, str(data_dir))
    if shards_dir is not None:
        plan.splits = splits_from_shards(shards_dir, ids)
        in_splits = {c for s in plan.splits for c in s["val"]}
        plan.unsplit = [c for c in ids if c not in in_splits]
    _check_existing(plan)
    return plan


def write_export(plan: ExportPlan) -> dict[str, int]:
    """Write a planned export: every file atomically, identical ones kept; ``dataset.json`` (and splits) last.

    Returns:
        ``{"copied": n, "kept": n}``.

    Raises:
        hpc_dfs.fsutil.DiskWriteError: the file system refused a write (names the file).
    """
    copied = kept = 0
    for src, dst in plan.files:
        if dst.is_file() and _same_file(dst, src):
            kept += 1
            continue
        with fsutil.atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        copied += 1
    if plan.splits is not None:
        fsutil.write_json(plan.out / SPLITS_NAME, plan.splits)
    fsutil.write_json(plan.out / NNUNET_DATASET_NAME, plan.dataset)
    return {"copied": copied, "kept": kept}


# ----------------------------------------------------------------------------- reading a raw dataset
class NnunetDatasetError(HpcDfsError):
    """An nnU-Net raw dataset that cannot be read as ours: a second channel, an unknown label (exit code 3)."""

    code = EXIT_DATA


@dataclass
class RawDataset:
    """An nnU-Net raw dataset as preprocess and predict read it."""

    root: Path
    cases: list[Path]              # per case its channel-0000 image file (a case reference of contracts.kits)
    label_map: dict[int, int]      # raw label -> our class index (CLASSES)
    dataset: str                   # "kits23" when a cyst class is among the labels, else "kits19"


_NAME_ALIASES = {"tumour": "tumor", "tumors": "tumor", "kidneys": "kidney", "cysts": "cyst"}


def _class_of(name: str) -> Optional[str]:
    key = name.strip().lower()
    key = _NAME_ALIASES.get(key, key)
    return key if key in CLASSES else None


def _label_map(path: Path, doc: dict) -> dict[int, int]:
    """Raw label -> class index from ``dataset.json``'s ``labels`` (plain, or KiTS23's regions)."""
    labels = doc.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise NnunetDatasetError(f"{path}: no 'labels' object")
    if any(isinstance(v, list) for v in labels.values()):   # region-based: only KiTS23's regions are known
        norm = {(_class_of(k) or k.strip().lower()): sorted(v) if isinstance(v, list) else [v]
                for k, v in labels.items()}
        want = {name: sorted(v) if isinstance(v, list) else [v] for name, v in KITS23_LABELS.items()}
        if norm != want or doc.get("regions_class_order") != KITS23_REGIONS_CLASS_ORDER:
            raise NnunetDatasetError(
                f"{path}: region labels {labels} (regions_class_order {doc.get('regions_class_order')}) are not "
                f"KiTS23's {KITS23_LABELS} with regions_class_order {KITS23_REGIONS_CLASS_ORDER}, the only regions "
                "hpc-dfs reads; give plain labels named background, kidney, tumor, cyst")
        return {0: 0, 1: CLASSES.index("kidney"), 2: CLASSES.index("tumor"), 3: CLASSES.index("cyst")}
    out: dict[int, int] = {}
    for name, value in labels.items():
        cls = _class_of(str(name))
        if cls is None or isinstance(value, bool) or not isinstance(value, int):
            raise NnunetDatasetError(f"{path}: label {name!r}: {value!r} is not one of ours (background, kidney, "
                                     "tumor, cyst, each with an integer value)")
        out[int(value)] = CLASSES.index(cls)
    if out.get(0) != 0 or CLASSES.index("kidney") not in out.values():
        raise NnunetDatasetError(f"{path}: labels {labels} need background 0 and a kidney label")
    return out


def read_raw_dataset(data_dir: str | Path, folder: str = NNUNET_IMAGE_DIRS[0]) -> RawDataset:
    """The cases of an nnU-Net v2 raw dataset's ``folder`` and its labels mapped to our classes.

    Args:
        data_dir: ``nnUNet_raw/DatasetNNN_NAME`` (``dataset.json`` beside ``imagesTr/``, ``labelsTr/``).
        folder: ``imagesTr`` (preprocess) or ``imagesTs`` (predict).

    Raises:
        NnunetDatasetError: ``dataset.json`` unreadable, more than one channel (in the file or as image files),
            an unknown label or other regions, or no image in ``folder``; the message names the file.
    """
    root = Path(data_dir)
    path = root / NNUNET_DATASET_NAME
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NnunetDatasetError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise NnunetDatasetError(f"{path}: not a JSON object")
    channels = doc.get("channel_names", doc.get("modality"))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise NnunetDatasetError(f"{path}: channel_names {channels!r}: hpc-dfs reads one channel (CT), this "
                                 f"dataset has {len(channels) if isinstance(channels, dict) else 'no'} channels")
    label_map = _label_map(path, doc)
    images = nnunet_images(root, folder)
    for cid, files in images.items():
        if [f.name[len(cid) + 1:len(cid) + 5] for f in files] != ["0000"]:
            raise NnunetDatasetError(f"{files[-1]}: case {cid} has channel files {[f.name for f in files]}; "
                                     f"{path} and hpc-dfs expect one channel, {cid}_0000")
    if not images:
        raise NnunetDatasetError(f"{root / folder}: no image NAME_0000.nii.gz of an nnU-Net dataset")
    return RawDataset(root, [files[0] for _, files in sorted(images.items())], label_map,
                      "kits23" if CLASSES.index("cyst") in label_map.values() else "kits19")
