"""What ``hpc-dfs preprocess`` knows before it decodes a volume (:class:`PreprocessPlan`), and one case loaded and
resampled onto the slice grid (:class:`CaseItem`, made only by :func:`load_item`).

    plan = make_plan(data_dir, cfg)                    # cases, clinical records, image headers; no communication
    item, part = load_item(plan.case_dirs["case_00003"], plan.label_map, spatial_params, sample=...)
    prev = reusable_shard(out_dir / shard_name(cid), cid, source_sha(case_dir))   # resume: (attrs, fg_samples)

Every rank builds the same plan from the same files. Bad settings or an unusable input folder raise
:class:`PreprocessError` (exit status 2); a bad *case* is recorded in ``plan.errors`` as ``[case_id] problem``
(or raises :class:`~hpc_dfs.data.kits_io.CaseError` from :func:`load_item`) and the other cases go on.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from hpc_dfs.data.fingerprint import CasePart
from hpc_dfs.data.geometry import make_geometry, prepare_label, resample_image
from hpc_dfs.contracts.kits import case_image, case_name, is_nnunet_dataset
from hpc_dfs.data.kits_io import (CLASSES, LABEL_MAPS, CaseError, KitsCase, detect_dataset, find_label_file,
                                  list_cases, load_case, near_misses, read_header)
from hpc_dfs.data.refine import refine_windows
from hpc_dfs.errors import EXIT_USAGE, HpcDfsError
from hpc_dfs.fsutil import sha256_file

__all__ = ["PreprocessError", "PreprocessPlan", "make_plan", "CaseItem", "load_item", "case_memory_need",
           "available_memory", "check_case_memory", "source_sha", "reusable_shard"]


class PreprocessError(HpcDfsError):
    """The input folder or a setting cannot be used at all (no cases, no clinical records, ...): exit status 2."""

    code = EXIT_USAGE


# ----------------------------------------------------------------------------- the plan
@dataclass
class PreprocessPlan:
    """The cases and their records, identical on every rank; nothing decoded yet.

    ``metas`` holds the labelled cases still in the running: their canonical header ``shape``, ``spacing``
    and ``n_voxels`` (``None`` where the header cannot be read: :func:`load_item` then names the problem).
    """

    data_dir: Path
    dataset: str                                   # kits19 | kits21 | kits23
    label_map: dict[int, int]                      # raw label -> class index
    classes: list[str]
    case_dirs: dict[str, Path]                     # every case folder, by id (sorted)
    metas: dict[str, Optional[dict]]
    errors: dict[str, str] = field(default_factory=dict)     # cases already known bad: "[case_id] problem"
    skipped: list[str] = field(default_factory=list)         # image but no ground truth (predict's business)
    clinical_file: Optional[Path] = None
    records: dict[str, dict] = field(default_factory=dict)   # clinical records by case id
    frame: Any = None                              # their pre-operative features (pandas), or None

    def readable(self) -> list[dict]:
        """The header metas of the cases whose header could be read (the spatial fingerprint's input)."""
        return [m for m in self.metas.values() if m is not None]


def make_plan(data_dir: Path, cfg) -> PreprocessPlan:
    """List the cases, read and check the clinical records, and read every image header (cheap).

    Args:
        data_dir: the KiTS-layout folder.
        cfg: a :class:`~hpc_dfs.config.data.PreprocessConfig`.

    Raises:
        PreprocessError: no case folders, no clinical records where ``clinical = "auto"``, or an unreadable
            clinical file.
    """
    from hpc_dfs.config.data import parse_label_map

    case_dirs, dataset, auto_map = _find_cases(data_dir)
    dataset = dataset if cfg.dataset == "auto" else cfg.dataset
    auto_map = auto_map if auto_map is not None and cfg.dataset == "auto" else LABEL_MAPS[dataset]
    label_map = auto_map if cfg.label_map == "auto" else parse_label_map(cfg.label_map)
    n_classes = max(label_map.values()) + 1
    classes = CLASSES[:n_classes] if n_classes <= len(CLASSES) else [f"class_{i}" for i in range(n_classes)]
    plan = PreprocessPlan(data_dir, dataset, label_map, classes, {case_name(cd): cd for cd in case_dirs}, {})
    plan.errors.update({name: f"[{name!r}] {why}" for name, why in near_misses(data_dir)})  # said, not skipped
    _read_clinical(plan, cfg.clinical)
    _read_headers(plan)
    return plan


def _find_cases(data_dir: Path) -> tuple[list[Path], str, Optional[dict[int, int]]]:
    """(case references, dataset, label map or None for the dataset's default) of a KiTS-layout folder or an
    nnU-Net raw dataset (its ``imagesTr``; the label map from its ``dataset.json``).

    Raises:
        PreprocessError: no such folder, or no case in it.
        hpc_dfs.data.nnunet.NnunetDatasetError: an nnU-Net dataset that cannot be read as ours (names the file).
    """
    if is_nnunet_dataset(data_dir):
        from hpc_dfs.data.nnunet import read_raw_dataset
        raw = read_raw_dataset(data_dir)
        return raw.cases, raw.dataset, raw.label_map
    try:
        return list_cases(data_dir), detect_dataset(data_dir), None
    except (FileNotFoundError, ValueError) as e:
        raise PreprocessError(str(e)) from None


def _read_clinical(plan: PreprocessPlan, setting: str) -> None:
    """Fill ``plan.records``/``frame`` from the clinical file; a missing or malformed record is a case error."""
    if setting == "none":  # before the import: pandas alone is ~35 MB of every rank's memory
        return
    from hpc_dfs.data import kits_clinical as clin

    path = clin.find_clinical_file(plan.data_dir) if setting == "auto" else Path(setting)
    if path is None:
        raise PreprocessError(f"no clinical records in {plan.data_dir} (kits.json, kits23.json or clinical.csv): "
                              "pass --clinical FILE, or --clinical none to preprocess CT only")
    try:
        records = clin.load_kits_records(path)
    except (FileNotFoundError, ValueError) as e:
        raise PreprocessError(str(e)) from None
    plan.clinical_file = path
    plan.records = {str(r["case_id"]): r for r in records}
    plan.frame, bad = clin.preop_frame(records, errors="collect", target="malignant")  # the shards' risk label
    for cid in plan.case_dirs:
        if cid not in plan.records:
            plan.errors[cid] = f"[{cid}] clinical record missing from {path.name}"
        elif cid in bad:
            plan.errors[cid] = bad[cid]
    if plan.case_dirs and all(cid in plan.errors for cid in plan.case_dirs):  # the file, not every case
        first = plan.errors[next(iter(plan.case_dirs))]
        raise PreprocessError(f"{path}: no usable clinical record for any of the {len(plan.case_dirs)} case(s) "
                              f"(e.g. {first}); pass --clinical FILE, or --clinical none to preprocess CT only")


def _read_headers(plan: PreprocessPlan) -> None:
    """``plan.metas`` from the image headers of the labelled cases; unlabelled ones go to ``plan.skipped``."""
    for cid, cd in plan.case_dirs.items():
        if cid in plan.errors:
            continue
        if find_label_file(cd) is None and case_image(cd).exists():
            plan.skipped.append(cid)
            continue
        try:
            shape, _, affine = read_header(case_image(cd), cid)
            g = make_geometry(shape, affine, {"slice_size": [1, 1]})
            plan.metas[cid] = {"case_id": cid, "shape": g["canonical_shape"], "spacing": g["canonical_spacing"],
                               "n_voxels": int(np.prod(shape))}
        except CaseError:
            plan.metas[cid] = None  # reported with the full message when the case is loaded


# ----------------------------------------------------------------------------- one case
@dataclass
class CaseItem:
    """One labelled case on the slice grid, not yet normalised: everything its shard is written from."""

    case_id: str
    hu: np.ndarray                  # (n, H, W) float32 HU, resampled
    labels: np.ndarray              # (n, H, W) uint8 class indices, same grid
    geometry: dict                  # the transform (hpc_dfs.data.geometry); predict inverts it
    original_shape: tuple[int, ...]
    spacing: tuple[float, ...]      # native voxel size along the stored axes, mm
    affine: np.ndarray              # native 4x4
    source_files: list[str]         # names of the files it was read from
    refine: Optional[dict] = None   # stage-2 windows in HU (hpc_dfs.data.refine.refine_windows), when planned

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (what the cache counts)."""
        extra = 0 if self.refine is None else self.refine["hu"].nbytes + self.refine["label"].nbytes
        return self.hu.nbytes + self.labels.nbytes + extra


def load_item(case_dir: Path, label_map: dict[int, int], spatial: dict,
              sample: Optional[Callable[[KitsCase], CasePart]] = None) -> tuple[CaseItem, Optional[CasePart]]:
    """Load and validate one case and resample it with the spatial parameters: the one place this is done.

    Args:
        case_dir: ``DATA/case_XXXXX``.
        label_map: raw label -> class index.
        spatial: the spatial preprocessing parameters (``target_spacing``, ``slice_size``, ``orientation``).
        sample: called on the loaded native case before resampling (the fingerprint's foreground sample).

    Returns:
        The item, and what ``sample`` returned (None without it).

    Raises:
        CaseError: the case is missing a file, unreadable or inconsistent (the message starts ``[case_id]``).
    """
    case = load_case(case_dir, label_map=label_map, require_label=True)
    part = sample(case) if sample is not None else None
    geom = make_geometry(case.image.shape, case.affine, spatial)
    labels = prepare_label(case.label, geom)
    # the native volume is in memory only here: cut the stage-2 windows now, then let the native label go
    # before the float32 slices are made (at most image + label, or image + slices, are held at once)
    windows = refine_windows(case.image, case.label, case.affine, spatial) if "refine" in spatial else None
    case.label = None
    hu, _ = resample_image(case.image, case.affine, spatial)
    item = CaseItem(case.case_id, hu, labels, geom, case.image.shape, case.spacing, case.affine,
                    [p.name for p in (case.image_path, case.label_path) if p is not None], refine=windows)
    return item, part


# ----------------------------------------------------------------------------- memory
_SLACK = 64 * 2 ** 20   # stage-2 windows, kidney components, the read chunk, an interpolation slab, allocator slack
_SHARD_COPY = 1.15      # a shard is built in memory (hpc_dfs.fsutil.atomic_h5) while its item is still held


def case_memory_need(case_dir: Path, spatial: dict) -> Optional[tuple[int, str]]:
    """(bytes, what) a rank needs, beyond what it already holds, to load, resample and write one case.

    From the headers only: the native image and label as stored (the label is mapped in place when it is
    uint8, else next to a uint8 copy), then either the native label or the float32 slices being made (the label
    is let go first), the uint8 label slices and the stage-2 windows, and the shard built in memory next to its
    slices. Measured (bench/bench_memory.py), the estimate is 10-30% above the real peak on KiTS19's largest
    shapes.

    Args:
        case_dir: ``DATA/case_XXXXX``.
        spatial: the spatial preprocessing parameters (``slice_size``, ``target_spacing``, ``orientation``).

    Returns:
        The bytes and ``"shape 1000x512x512 int16"``; None when a header cannot be read (:func:`load_item`
        names that problem).
    """
    import nibabel as nib

    lab_path = find_label_file(case_dir)
    try:
        img = nib.load(str(case_image(case_dir)))
        shape, dtype = tuple(int(s) for s in img.shape), np.dtype(img.get_data_dtype())
        lab = nib.load(str(lab_path)) if lab_path is not None else None
        geom = make_geometry(shape, img.affine, spatial)
    except Exception:  # a broken or missing file: load_item reports it with the full message
        return None
    n = int(np.prod(shape, dtype=np.int64))
    slope, inter = img.dataobj.slope, img.dataobj.inter
    image_b = n * (dtype.itemsize if (slope, inter) == (1, 0) else dtype.itemsize + 8)  # scaled: float64 copy
    label_b = 0
    if lab is not None:
        ldt = np.dtype(lab.get_data_dtype())
        label_b = int(np.prod(lab.shape, dtype=np.int64)) * (ldt.itemsize + (0 if ldt == np.uint8 else 1))
    n2, (hs, ws) = geom["resampled_shape"][0], geom["slice_size"]
    hu_b, lab_out = n2 * hs * ws * 4, n2 * hs * ws
    refine = spatial.get("refine")
    if refine:  # at most max_boxes windows over every slice, float32 + uint8 (a kidney spans fewer slices)
        lab_out += int(refine["max_boxes"]) * geom["canonical_shape"][0] * int(np.prod(refine["slice_size"])) * 5
    load = image_b + max(label_b, hu_b) + lab_out
    write = _SHARD_COPY * 2 * (hu_b + lab_out)
    return int(max(load, write) + _SLACK), f"shape {'x'.join(map(str, shape))} {dtype.name}"


def available_memory(limit_mb: int = 0, ranks_per_node: int = 1) -> tuple[int, str]:
    """(bytes, how) this rank may use: ``limit_mb`` MiB when set, else the node's free memory shared by its ranks.

    Free memory is ``MemAvailable`` of ``/proc/meminfo``, or less when the cgroup (``memory.max`` less
    ``memory.current``) allows less; it is divided by ``ranks_per_node``, since every rank of the node may load
    a case at the same time.

    Args:
        limit_mb: a fixed budget in MiB (``PreprocessConfig.memory_limit_mb``); 0: from the system.
        ranks_per_node: the ranks sharing this node's memory.
    """
    if limit_mb > 0:
        return int(limit_mb) * 2 ** 20, f"memory_limit_mb = {int(limit_mb)}"
    free = _meminfo_available()
    cgroup = _cgroup_left()
    if cgroup is not None:
        free = cgroup if free is None else min(free, cgroup)
    if free is None:  # no /proc (not Linux): nothing to compare with
        return 2 ** 62, "no memory figure on this system"
    k = max(1, int(ranks_per_node))
    return free // k, f"{free / 1e9:.1f} GB free / {k} rank{'s' if k > 1 else ''} on this node"


def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_left() -> Optional[int]:
    """Bytes the cgroup (v2, else v1) still allows, or None without a limit."""
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 2 ** 60:
                return None
            return max(0, int(text) - int(Path(used).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def check_case_memory(case_dir: Path, spatial: dict, limit_mb: int = 0, ranks_per_node: int = 1) -> None:
    """Refuse, before it is decoded, a case this rank has not the memory for (one line instead of an OOM kill).

    Args:
        case_dir: ``DATA/case_XXXXX``.
        spatial: the spatial preprocessing parameters.
        limit_mb: see :func:`available_memory`.
        ranks_per_node: see :func:`available_memory`.

    Raises:
        CaseError: ``[case_id] needs about X GB to preprocess (...) but this rank has Y GB available (...)``.
    """
    need = case_memory_need(case_dir, spatial)
    if need is None:
        return
    have, how = available_memory(limit_mb, ranks_per_node)
    if need[0] > have:
        raise CaseError(case_name(case_dir), f"needs about {_size(need[0])} to preprocess ({need[1]}) but this rank "
                                             f"has {_size(have)} available ({how}): use fewer ranks per node "
                                             "(--ntasks-per-node) or a node with more memory")


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.0f} MB"


# ----------------------------------------------------------------------------- resume
def source_sha(case_dir: Path) -> str:
    """sha256 over the case's input files (imaging, then ground truth), hex; "" without an image.

    Args:
        case_dir: ``DATA/case_XXXXX``.
    """
    if not case_image(case_dir).exists():
        return ""
    h = hashlib.sha256()
    for p in (case_image(case_dir), find_label_file(case_dir)):
        if p is not None and p.exists():
            h.update(p.name.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def reusable_shard(shard: Path, cid: str, sha: str) -> Optional[tuple[dict, np.ndarray]]:
    """(attrs, fg_samples) of an existing shard that verifies and was made from the same input files, else None.

    Args:
        shard: the shard's path.
        cid: its case id.
        sha: :func:`source_sha` of the case's inputs now ("" never matches).
    """
    import h5py
    from hpc_dfs.data.shards import read_case_attrs, validate_shard

    if not sha or not shard.exists():
        return None
    ok, _why = validate_shard(shard, cid)
    if not ok:
        return None
    attrs = read_case_attrs(shard, cid)
    if attrs.get("source_sha256") != sha:
        return None
    with h5py.File(shard, "r") as f:
        return attrs, f[cid]["fg_samples"][()]
