"""Reading and writing KiTS-layout data with nibabel.

Layouts understood (see ``hpc_dfs/CONTRACTS.md`` section 1; the names are those of
:mod:`hpc_dfs.contracts.kits`, re-exported here)::

    DATA/case_XXXXX/imaging.nii.gz                     CT in HU
    DATA/case_XXXXX/segmentation.nii.gz                KiTS19/KiTS23 ground truth
    DATA/case_XXXXX/aggregated_MAJ_seg.nii.gz          KiTS21 ground truth (majority vote)
    DATA/kits.json | DATA/kits23.json                  clinical records

KiTS19 labels are 0 background, 1 kidney, 2 tumour; KiTS21/23 add 3 cyst, kept as a fourth class by default
(the KiTS23 evaluation scores it in its regions). A ``label_map`` (raw label -> class index) maps them to the
classes that the models learn; ``--set label_map=0:0,1:1,2:2,3:1`` folds a cyst into kidney.

Every problem with a case raises :class:`CaseError`, whose message starts with the case id
(``[case_00007] truncated gzip: ...``), so one line tells the user what to fix.

Usage::

    from hpc_dfs.data.kits_io import list_cases, load_case
    for case_dir in list_cases("data/kits"):
        case = load_case(case_dir, label_map={0: 0, 1: 1, 2: 2})
        case.image, case.label, case.affine, case.spacing
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from hpc_dfs.contracts.kits import (CASE_RE, IMAGE_NAME, KITS21_LABEL_NAME, KITS23_CLINICAL_NAME, LABEL_FILES,
                                   case_image, case_name, find_label_file, near_misses)
from hpc_dfs.data.checks import GeometryProblem, IntensityProblem, check_intensities, checked_spacing
from hpc_dfs.errors import EXIT_DATA, HpcDfsError
from hpc_dfs.fsutil import atomic_path

__all__ = ["CaseError", "KitsCase", "CASE_RE", "IMAGE_NAME", "LABEL_FILES", "LABEL_MAPS", "CLASSES",
           "list_cases", "near_misses", "detect_dataset", "find_label_file", "read_header", "load_case", "load_nifti",
           "save_nifti_atomic", "kits_affine", "apply_label_map"]

#: class names by index; KiTS21/23 data (4 classes) names the fourth "cyst"
CLASSES = ["background", "kidney", "tumor", "cyst"]
#: default raw-label -> class maps per dataset; KiTS21/23 keep the cyst (label 3) as its own class
LABEL_MAPS = {
    "kits19": {0: 0, 1: 1, 2: 2},
    "kits21": {0: 0, 1: 1, 2: 2, 3: 3},
    "kits23": {0: 0, 1: 1, 2: 2, 3: 3},
}
_AFFINE_ATOL = 1e-3  # mm; headers written by different tools differ in float rounding only


class CaseError(HpcDfsError):
    """A problem with one case; ``str(err)`` reads ``[case_id] problem`` (exit code 3, bad input data)."""

    code = EXIT_DATA

    def __init__(self, case_id: str, problem: str):
        self.case_id = case_id
        self.problem = problem
        super().__init__(f"[{case_id}] {problem}")


@dataclass
class KitsCase:
    """One loaded case: arrays as stored on disk (no reorientation), and where they came from."""

    case_id: str
    image: np.ndarray                      # HU, as stored (int16 / float)
    affine: np.ndarray                     # 4x4 voxel -> world (RAS mm)
    label: Optional[np.ndarray] = None     # class indices (label_map applied), uint8
    image_path: Optional[Path] = None
    label_path: Optional[Path] = None
    header_zooms: tuple = field(default_factory=tuple)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along the stored array axes."""
        return tuple(float(z) for z in self.header_zooms[:3])

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.image.shape))


# ----------------------------------------------------------------------------- discovery
def list_cases(data_dir: str | Path) -> list[Path]:
    """Case folders (``case_XXXXX``, :data:`~hpc_dfs.contracts.kits.CASE_RE`) of a KiTS-layout directory, sorted by id.

    Args:
        data_dir: the KiTS-layout folder.

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: it holds no case folder (the message says how to make one).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    cases = sorted(p for p in data_dir.iterdir() if p.is_dir() and CASE_RE.match(p.name))
    if not cases:
        raise ValueError(f"no case folders (case_XXXXX/) in {data_dir}: expected the KiTS layout "
                         f"case_XXXXX/{IMAGE_NAME} (make one with `hpc-dfs synth --out {data_dir}`)")
    return cases


def detect_dataset(data_dir: str | Path) -> str:
    """'kits21' if any case holds aggregated_MAJ_seg.nii.gz, 'kits23' if kits23.json is present, else 'kits19'.

    Args:
        data_dir: the KiTS-layout folder.
    """
    data_dir = Path(data_dir)
    if any(data_dir.glob(f"case_*/{KITS21_LABEL_NAME}")):
        return "kits21"
    if (data_dir / KITS23_CLINICAL_NAME).exists():
        return "kits23"
    return "kits19"


# ----------------------------------------------------------------------------- reading
def _describe_read_error(e: BaseException, path: Optional[Path] = None) -> str:
    """Name the real problem: nibabel reports a gzip cut short as anything from EOFError to
    'Cannot work out file type', so for .gz files the stream itself is checked."""
    if path is not None and path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                while fh.read(1 << 22):
                    pass
        except EOFError as ge:
            return f"truncated gzip: {ge}"
        except (gzip.BadGzipFile, zlib.error, OSError) as ge:
            return f"unreadable gzip: {ge}"
    if isinstance(e, EOFError) or "end-of-stream" in str(e) or "ended before" in str(e):
        return f"truncated gzip: {e}"
    if isinstance(e, (zlib.error, gzip.BadGzipFile)):
        return f"unreadable gzip: {e}"
    return f"unreadable NIfTI: {type(e).__name__}: {e}"


def read_header(path: Path, case_id: str) -> tuple[tuple[int, ...], tuple[float, ...], np.ndarray]:
    """(shape, zooms, affine) from the header only (cheap: decompresses a few hundred bytes).

    Args:
        path: the NIfTI file.
        case_id: the case named in an error.

    Raises:
        CaseError: the file is missing, its header cannot be read, or it is not 3-D.
    """
    if not path.exists():
        raise CaseError(case_id, f"missing {path.name} ({path})")
    try:
        img = nib.load(str(path))
        shape, zooms = tuple(int(s) for s in img.shape), tuple(float(z) for z in img.header.get_zooms())
    except Exception as e:  # nibabel raises many types for broken files
        raise CaseError(case_id, f"{path.name}: {_describe_read_error(e, path)}") from None
    if len(shape) != 3:  # as load_nifti: a 2-D (or 4-D) volume is this case's error, not the stage's IndexError
        raise CaseError(case_id, f"{path.name} has {len(shape)} dimensions {shape}, expected 3")
    return shape, _spacing(case_id, path, shape, img.affine, zooms), img.affine


def _spacing(case_id: str, path: Path, shape, affine: np.ndarray, zooms) -> tuple[float, ...]:
    """The checked spacing (:func:`hpc_dfs.data.checks.checked_spacing`); a problem is this case's error."""
    try:
        return checked_spacing(shape, affine, zooms)
    except GeometryProblem as e:
        raise CaseError(case_id, f"{path.name} {e}") from None


_READ_CHUNK = 1 << 22  # bytes decompressed per read: the only transient copy of a .nii.gz volume


def _read_data(img, path: Path) -> np.ndarray:
    """The voxel array of a loaded NIfTI, exactly as ``np.asanyarray(img.dataobj)`` gives it.

    A ``.nii.gz`` without scaling is decompressed straight into the array in chunks of :data:`_READ_CHUNK`:
    nibabel's own read of a gzip stream holds the whole decompressed volume twice (Python's gzip
    ``readinto`` decompresses into a temporary ``bytes`` of the full size, then copies it). Anything else
    (uncompressed files, memory-mapped by nibabel; scaled data) goes through nibabel.

    Args:
        img: the image from ``nib.load``.
        path: its file (the ``.gz`` suffix chooses the chunked read).

    Raises:
        OSError: the stream holds fewer bytes than the header promises (as nibabel's own message).
    """
    proxy = img.dataobj
    plain = getattr(proxy, "slope", None) == 1 and getattr(proxy, "inter", None) == 0
    if not (path.name.endswith(".gz") and plain and hasattr(proxy, "offset")):
        return np.asanyarray(proxy)
    shape, dtype = tuple(proxy.shape), np.dtype(proxy.dtype)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = bytearray(n_bytes)
    view, done = memoryview(buf), 0
    with nib.openers.ImageOpener(str(path), "rb") as fh:
        fh.seek(int(proxy.offset))
        while done < n_bytes:
            got = fh.readinto(view[done:done + _READ_CHUNK])
            if not got:
                break
            done += got
    view.release()
    if done != n_bytes:
        raise OSError(f"Expected {n_bytes} bytes, got {done} bytes from {path}\n - could the file be damaged?")
    return np.ndarray(shape, dtype, buffer=buf, order=proxy.order)


def load_nifti(path: Path, case_id: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Decode a NIfTI fully: (array with scaling applied, affine, zooms).

    Args:
        path: the NIfTI file.
        case_id: the case named in an error.

    Raises:
        CaseError: the file is missing, truncated, unreadable or not 3-D (the message names case and file).
    """
    if not path.exists():
        raise CaseError(case_id, f"missing {path.name} ({path})")
    try:
        img = nib.load(str(path))
        arr = _read_data(img, path)
    except Exception as e:
        raise CaseError(case_id, f"{path.name}: {_describe_read_error(e, path)}") from None
    if arr.ndim != 3:
        raise CaseError(case_id, f"{path.name} has {arr.ndim} dimensions {arr.shape}, expected 3")
    return arr, img.affine, _spacing(case_id, path, arr.shape, img.affine, img.header.get_zooms()[:3])


_SLAB_VOXELS = 1 << 22  # voxels per slab of the label checks and lookups (bounds their temporaries)


def _slabs(arr: np.ndarray):
    """Index tuples of slabs of ``arr`` along its slowest axis in memory (the last for a Fortran-ordered array)."""
    axis = arr.ndim - 1 if arr.flags.f_contiguous and not arr.flags.c_contiguous else 0
    n = arr.shape[axis] if arr.ndim else 1
    per = max(1, _SLAB_VOXELS // max(1, arr.size // max(1, n)))
    for a in range(0, n, per):
        idx = [slice(None)] * arr.ndim
        idx[axis] = slice(a, a + per)
        yield tuple(idx)


def _as_index(raw_slab: np.ndarray) -> np.ndarray:
    """A slab of raw labels as lookup indices (integral floats -> int64; integers as they are)."""
    return raw_slab.astype(np.int64) if raw_slab.dtype.kind == "f" else raw_slab


def apply_label_map(raw: np.ndarray, label_map: dict[int, int], case_id: str, name: str,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
    """Map raw labels to class indices (uint8); values outside the label set are a :class:`CaseError`.

    Uses a lookup table bounded by ``raw.max()`` instead of ``np.unique`` (a 512x512x600 volume
    sorts for seconds; the lookup takes a fraction of that). Works slab by slab, so its temporaries stay
    small whatever the volume; the result keeps ``raw``'s memory order.

    Args:
        raw: the label volume as stored.
        label_map: raw label -> class index.
        case_id: the case named in an error.
        name: the file named in an error.
        out: where to write the classes (uint8, ``raw``'s shape; ``raw`` itself when it is uint8 and may be
            overwritten); default a new array. Written only once ``raw`` has been checked.

    Raises:
        CaseError: non-integer values, or a value outside ``label_map``.
    """
    if raw.dtype.kind == "f":
        for sl in _slabs(raw):
            r = raw[sl]
            if not np.all(np.isfinite(r)) or np.any(r != np.rint(r)):
                raise CaseError(case_id, f"{name} holds non-integer label values")
    lo, hi = (int(v) for v in (raw.min(), raw.max()))
    allowed = sorted(label_map)
    if lo < 0 or hi > max(allowed):
        bad = lo if lo < 0 else hi
        hint = (" (a KiTS21/23 cyst in data read as KiTS19: pass --dataset kits23, or --label-map "
                "0:0,1:1,2:2,3:1 to count it as kidney)" if bad == 3 and allowed == [0, 1, 2] else "")
        raise CaseError(case_id, f"{name} holds label value {bad} outside the label set {allowed}{hint}")
    lut = np.full(hi + 1, 255, dtype=np.uint8)
    for r, c in label_map.items():
        if r <= hi:
            lut[r] = c
    if hi >= 1 and any(np.any(lut[_as_index(raw[sl])] == 255) for sl in _slabs(raw)):
        bad = sorted(set(range(hi + 1)) - set(allowed))
        present = [b for b in bad if np.any(raw == b)]
        raise CaseError(case_id, f"{name} holds label value {present[0]} outside the label set {allowed}")
    if out is None:
        out = np.empty(raw.shape, dtype=np.uint8, order="F" if raw.flags.f_contiguous else "C")
    for sl in _slabs(raw):
        out[sl] = lut[_as_index(raw[sl])]
    return out


def load_case(case_dir: str | Path, label_map: Optional[dict[int, int]] = None, require_label: bool = False,
              check_finite: bool = True) -> KitsCase:
    """Load and validate one case: a KiTS case folder, or an nnU-Net image file (``imagesTr/NAME_0000.nii.gz``,
    its ground truth in ``labelsTr``; :func:`hpc_dfs.contracts.kits.case_image`).

    Checks: imaging present and decodable (truncated/corrupt gzip), 3-D, finite voxels, the label
    map (if any) has the image's shape and affine and only values of ``label_map``.

    Args:
        case_dir: ``.../case_XXXXX``, or an nnU-Net image file.
        label_map: raw label -> class; default KiTS19 (0, 1, 2).
        require_label: a missing ground truth is an error (else ``label`` is None).
        check_finite: reject voxels that cannot be CT (complex, NaN/inf as float32, beyond +-1e5 HU).

    Raises:
        CaseError: any of the problems above; ``str(err)`` reads ``[case_id] problem``.
    """
    case_dir = Path(case_dir)
    cid = case_name(case_dir)
    label_map = label_map or LABEL_MAPS["kits19"]
    img_path = case_image(case_dir)
    image, affine, zooms = load_nifti(img_path, cid)
    if check_finite:  # before the case reaches any statistic: complex, non-finite as float32, not CT
        try:
            check_intensities(image)
        except IntensityProblem as e:
            raise CaseError(cid, f"{img_path.name} {e}") from None
    case = KitsCase(cid, image, affine, image_path=img_path, header_zooms=zooms)
    lab_path = find_label_file(case_dir)
    if lab_path is None:
        if require_label:
            raise CaseError(cid, f"missing ground truth ({' or '.join(LABEL_FILES)}) in {case_dir}")
        return case
    raw, lab_affine, _ = load_nifti(lab_path, cid)
    if raw.shape != image.shape:
        raise CaseError(cid, f"image/label shape mismatch: {img_path.name} {image.shape} vs {lab_path.name} "
                             f"{raw.shape}")
    if not np.allclose(affine, lab_affine, atol=_AFFINE_ATOL):
        diff = float(np.abs(affine - lab_affine).max())
        raise CaseError(cid, f"affine mismatch between {img_path.name} and {lab_path.name} (max difference "
                             f"{diff:.4g} mm): the label map is not on the image grid")
    in_place = raw if raw.dtype == np.uint8 and raw.flags.writeable else None  # ours: just decoded
    case.label = apply_label_map(raw, label_map, cid, lab_path.name, out=in_place)
    case.label_path = lab_path
    return case


# ----------------------------------------------------------------------------- writing
def kits_affine(spacing_zyx: tuple[float, float, float],
                origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The KiTS affine: array axes (slices, rows, cols) with orientation codes ('I', 'P', 'L').

    Args:
        spacing_zyx: voxel size in mm along (slices, rows, cols).
        origin: world position of voxel (0, 0, 0), mm.
    """
    sz, sy, sx = spacing_zyx
    aff = np.zeros((4, 4))
    aff[0, 2] = -sx
    aff[1, 1] = -sy
    aff[2, 0] = -sz
    aff[:3, 3] = origin
    aff[3, 3] = 1.0
    return aff


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype=None) -> Path:
    """Write a NIfTI-1 file atomically (temp name + rename); returns the path.

    Args:
        array: the volume.
        affine: its 4x4 voxel -> world matrix (written as qform and sform).
        path: the file to write.
        dtype: the on-disk type (e.g. ``np.int16`` for CT, ``np.uint8`` for labels); default the array's.
    """
    path = Path(path)
    arr = np.asarray(array if dtype is None else array.astype(dtype, copy=False))
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
