"""HDF5 shards: writing one case atomically, reading its slices with every read verified, and checking shards.

Layout (``hpc_dfs/CONTRACTS.md`` section 2, shard format 2): one group ``/<case_id>/`` per case with
datasets ``image`` float32 (n, H, W), ``label`` uint8 (n, H, W), ``classes_present`` uint8 (n, C),
``clinical`` float32 (F,), ``fg_samples`` float32 (k,) (the case's fingerprint sample, so a resumed
run need not decode the NIfTI again) and ``slice_checksums`` uint64 (n, 2) (one checksum of the
bytes of each image slice and each label slice), plus the attributes listed in the contract, among
them ``schema_version`` (2) and ``checksum`` (the algorithm of ``slice_checksums``).

Storage choices (measured in ``bench/bench_reader.py``, figures in ``bench/results/reader.json``):

- **chunks of one slice** ``(1, H, W)``, **uncompressed by default** (``compression="none"``): a
  slice is then H*W contiguous bytes in the file, and :class:`CaseShard` reads it straight from a
  memory map of the file at the chunk's offset (no HDF5 call, no decompression): a read costs one
  memory copy plus one checksum, about the memmap floor. ``lzf`` and ``gzip`` remain for small disks
  (shards 4-5x smaller, reads 4-5x slower: they go through HDF5's filter pipeline);
- **a checksum of every slice**, checked on every read: ``xxh3_64`` (the ``xxhash`` package, ~20-90
  GB/s, so a 256x256 float32 slice costs ~3 us) or, where ``xxhash`` is not installed, ``crc32``
  (``zlib``, ~2 GB/s). The algorithm is stored in the shard, so every reader checks what the writer
  computed. A mismatch raises :class:`ShardError` naming the shard, the case and the slice;
- **fletcher32 on every dataset** too: HDF5 verifies each chunk when it reads it through its own
  pipeline (the small datasets, the compressed layouts, format-1 shards and any h5py user);
- stored dtype float32: float16 halves the bytes but its conversion back to float32 costs ~50x a
  memory copy on this CPU (149 us per 256x256 slice, more than the whole read), and it would round
  normalised CT to 11 significant bits; int16 would need a per-case scale. Not worth it;
- ``track_times=False`` so that two runs write the same bytes for the same arrays.

Format-1 shards (no ``schema_version`` attribute, written before the checksums) stay readable, through
h5py with their fletcher32 checks; a shard of a newer format than this code knows is refused.

A shard is written under a ``.tmp-*`` name (``hpc_dfs.fsutil.atomic_path``) and renamed only
after it is closed and fsync'ed, with the attribute ``complete=1`` set last: a process killed at
any moment leaves either no file, a ``.tmp-*`` file no reader opens, or a complete shard.

Usage::

    write_case_shard(out / "shard-case_00002.h5", "case_00002", image, label, classes_present,
                     clinical, fg_samples, attrs)
    ok, why = validate_shard(out / "shard-case_00002.h5")
    with CaseShard(out / "shard-case_00002.h5", "case_00002") as shard:
        image, label = shard.read(3)      # verified; ShardError names shard, case and slice
"""
from __future__ import annotations

import json
import mmap
import zlib
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np

from hpc_dfs.contracts.shards import SHARD_SCHEMA_VERSION, ShardError, shard_name
from hpc_dfs.fsutil import atomic_h5

try:  # the fast checksum; optional so that shards can be written and read without it (crc32)
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

__all__ = ["SLICE_DATASETS", "REFINE_GROUP", "SHARD_SCHEMA_VERSION", "ShardError", "CaseShard", "shard_name",
           "write_case_shard", "validate_shard", "read_case_attrs", "dataset_filters", "default_checksum",
           "slice_checksum"]

SLICE_DATASETS = ("image", "label")
#: the subgroup of a case holding the cascade's stage-2 windows (hpc_dfs.data.refine)
REFINE_GROUP = "refine"
_REQUIRED = ("image", "label", "classes_present", "clinical", "fg_samples")


# ----------------------------------------------------------------------------- checksums
def default_checksum() -> str:
    """The checksum algorithm new shards get: ``xxh3_64`` when ``xxhash`` is installed, else ``crc32``."""
    return "xxh3_64" if xxhash is not None else "crc32"


def _hasher(name: str, where: str) -> Callable[[np.ndarray], int]:
    if name == "xxh3_64":
        if xxhash is None:
            raise ShardError(f"{where}: its slice checksums are xxh3_64, which needs the 'xxhash' package "
                             "(pip install xxhash)")
        return xxhash.xxh3_64_intdigest
    if name == "crc32":
        return zlib.crc32
    raise ShardError(f"{where}: unknown slice checksum '{name}' (this hpc-dfs knows xxh3_64 and crc32)")


def slice_checksum(arr: np.ndarray, name: str = "xxh3_64") -> int:
    """Checksum ``name`` of the bytes of a C-contiguous array (what ``slice_checksums`` holds per slice)."""
    return int(_hasher(name, "slice_checksum")(np.ascontiguousarray(arr)))


# ----------------------------------------------------------------------------- writing
def _filters(compression: str, level: int) -> dict:
    if compression == "lzf":
        return {"compression": "lzf"}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": int(level), "shuffle": True}
    if compression == "none":
        return {}
    raise ValueError(f"unknown compression '{compression}' (none, lzf or gzip)")


def write_case_shard(path: str | Path, case_id: str, image: np.ndarray, label: np.ndarray,
                     classes_present: np.ndarray, clinical: np.ndarray, fg_samples: np.ndarray, attrs: dict,
                     compression: str = "none", level: int = 1, refine: Optional[dict] = None) -> Path:
    """Write one case's shard atomically (format :data:`SHARD_SCHEMA_VERSION`).

    Args:
        path: the shard file (written under a ``.tmp-*`` name, renamed when complete).
        case_id: the group name.
        image: float32 (n, H, W) normalised slices; label: uint8 (n, H, W) class indices.
        classes_present: (n, C) 1 where class c occurs in slice i.
        clinical: (F,) features; fg_samples: (k,) foreground intensity samples.
        attrs: group attributes: numbers, strings, arrays or JSON-able objects.
        compression: ``none`` (memory-mapped reads), ``lzf`` or ``gzip`` (with ``level``).
        refine: the cascade's stage-2 windows (:data:`REFINE_GROUP` subgroup): ``image``, ``label``,
            ``classes_present`` as above, ``stack`` (M,) the window of each slice, ``boxes`` (JSON).

    Raises:
        ValueError: unknown compression, or image and label shapes differ.
    """
    path = Path(path)
    filt = _filters(compression, level)
    algo = default_checksum()
    with atomic_h5(path, track_order=True) as f:  # in memory: libhdf5 segfaults on a full disk at close
        g = f.create_group(case_id)
        common = dict(fletcher32=True, track_times=False)
        _slices(g, path.name, image, label, classes_present, algo, common, filt)
        _small(g, "clinical", np.asarray(clinical, dtype=np.float32).reshape(-1), common)
        _small(g, "fg_samples", np.asarray(fg_samples, dtype=np.float32).reshape(-1), common, cap=1 << 16)
        if refine is not None:
            r = g.create_group(REFINE_GROUP)
            _slices(r, path.name, refine["image"], refine["label"], refine["classes_present"], algo, common, filt)
            _small(r, "stack", np.asarray(refine["stack"], dtype=np.int16).reshape(-1), common)
            r.attrs["boxes"] = json.dumps(refine.get("boxes", []))
        for k, v in attrs.items():
            g.attrs[k] = _attr(v)
        g.attrs["schema_version"] = SHARD_SCHEMA_VERSION
        g.attrs["checksum"] = algo
        g.attrs["complete"] = 1  # last: a reader seeing this knows every dataset was written
    return path


def _slices(g: h5py.Group, where: str, image: np.ndarray, label: np.ndarray, classes_present: np.ndarray, algo: str,
            common: dict, filt: dict) -> None:
    """``image``, ``label`` (one chunk per slice), their per-slice checksums and ``classes_present`` in ``g``."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    label = np.ascontiguousarray(label, dtype=np.uint8)
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"{where}: image {image.shape} and label {label.shape} must be the same (n, H, W)")
    n, h, w = image.shape
    hash_fn = _hasher(algo, where)
    sums = np.array([[hash_fn(image[i]), hash_fn(label[i])] for i in range(n)], dtype=np.uint64).reshape(n, 2)
    grow = {} if n else {"maxshape": (None, h, w)}  # a case without kidney has no stage-2 window
    g.create_dataset("image", data=image, chunks=(1, h, w), **grow, **common, **filt)
    g.create_dataset("label", data=label, chunks=(1, h, w), **grow, **common, **filt)
    _small(g, "slice_checksums", sums, common)
    _small(g, "classes_present", np.asarray(classes_present, dtype=np.uint8), common)


def _small(g: h5py.Group, name: str, data: np.ndarray, common: dict, cap: Optional[int] = None) -> None:
    """A small dataset, one chunk (at most ``cap`` rows), growable along axis 0 so that it may be empty.

    Chunked datasets need at least one element per dimension: an empty vector (clinical=none) is stored
    with a fixed 1-row chunk and an unlimited first axis.
    """
    rows = max(1, data.shape[0] if cap is None else min(data.shape[0], cap))
    g.create_dataset(name, data=data, chunks=(rows, *data.shape[1:]), maxshape=(None, *data.shape[1:]), **common)


def _attr(v):
    if isinstance(v, (dict, list, tuple)) and not (isinstance(v, (list, tuple)) and v and
                                                    all(isinstance(x, (int, float)) for x in v)):
        return json.dumps(v)
    if v is None:
        return "null"
    return v


def dataset_filters(ds: h5py.Dataset) -> dict:
    """The storage settings of a dataset (chunks, compression, shuffle, fletcher32)."""
    return {"chunks": ds.chunks, "compression": ds.compression, "shuffle": ds.shuffle, "fletcher32": ds.fletcher32}


# ----------------------------------------------------------------------------- reading
class CaseShard:
    """One case's shard opened for reading slices; every :meth:`read` verifies what it returns.

    Format 2, uncompressed: the slices are read from a read-only memory map of the file at their
    chunks' offsets (found once at open; a chunk is the slice's bytes plus HDF5's 4-byte fletcher32)
    and copied, and the copy's checksum is compared with ``slice_checksums``. Compressed format 2: read
    through h5py (fletcher32 on the compressed chunk) and the decoded slice's checksum compared.
    Format 1: through h5py, fletcher32 only.

    Args:
        path: the shard file.
        case_id: its case (the group name).
        part: None for the case's whole slices, or :data:`REFINE_GROUP` for its stage-2 windows.

    Raises:
        ShardError: the file does not open, lacks the case (or the part), is of an unknown format or is truncated.
    """

    def __init__(self, path: str | Path, case_id: str, part: Optional[str] = None) -> None:
        self.path, self.case_id, self.part = Path(path), case_id, part
        self._where = f"{self.path.name} ({case_id}{'' if part is None else ', ' + part})"
        self._mm = self._raw = None
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise ShardError(f"{self.path}: cannot open the shard: {e}") from None
        try:
            self._open_group()
        except BaseException:
            self.close()
            raise

    def _open_group(self) -> None:
        if self.case_id not in self._f:
            raise ShardError(f"{self.path.name} does not hold {self.case_id}")
        g = self._f[self.case_id]
        self.version = int(g.attrs.get("schema_version", 1))
        if self.version > SHARD_SCHEMA_VERSION:
            raise ShardError(f"{self._where}: shard schema_version {self.version}, this hpc-dfs reads 1 to "
                             f"{SHARD_SCHEMA_VERSION}: upgrade hpc-dfs or rerun preprocess")
        algo = g.attrs.get("checksum", "")
        if self.part is not None:
            if self.part not in g:
                raise ShardError(f"{self._where}: the shard has no '{self.part}' group: preprocess again with "
                                 f"{self.part}.enabled=true")
            g = g[self.part]
        self.group = g
        self.image_ds, self.label_ds = g["image"], g["label"]
        self.shape = self.image_ds.shape
        self._sums = self._hash = None
        if self.version >= 2:
            self.checksum = algo.decode() if isinstance(algo, bytes) else str(algo)
            self._hash = _hasher(self.checksum, self._where)
            sums = g["slice_checksums"][()]
            if sums.shape != (self.shape[0], 2):
                raise ShardError(f"{self._where}: slice_checksums has shape {sums.shape}, expected "
                                 f"({self.shape[0]}, 2)")
            self._sums = sums.tolist()
            self._raw = self._chunk_offsets()
            if self._raw is not None:
                with open(self.path, "rb") as fh:
                    self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                if len(self._mm) < self._raw["end"]:
                    raise ShardError(f"{self._where}: truncated ({len(self._mm)} bytes, its slices end at "
                                     f"{self._raw['end']})")

    def _chunk_offsets(self) -> Optional[dict]:
        """File offsets of every image and label slice when they can be memory-mapped, else None."""
        n, h, w = self.shape
        out = {"end": 0}
        for name, ds, dtype in (("image", self.image_ds, np.dtype("<f4")), ("label", self.label_ds, np.dtype("u1"))):
            if ds.compression is not None or ds.shuffle or ds.chunks != (1, h, w) or ds.dtype != dtype:
                return None
            nbytes = h * w * dtype.itemsize
            offs = np.full(n, -1, dtype=np.int64)

            def visit(info, offs=offs, nbytes=nbytes, ds=ds):
                if info.filter_mask != 0 or info.size != nbytes + (4 if ds.fletcher32 else 0):
                    raise ShardError(f"{self._where}: {ds.name} chunk {info.chunk_offset} is not a plain slice")
                offs[info.chunk_offset[0]] = info.byte_offset

            ds.id.chunk_iter(visit)
            if (offs < 0).any():
                raise ShardError(f"{self._where}: {name} slice {int(np.flatnonzero(offs < 0)[0])} was never written")
            out[name] = (offs.tolist(), dtype, h * w)
            out["end"] = max(out["end"], int(offs.max()) + nbytes if n else 0)
        return out

    def __len__(self) -> int:
        return int(self.shape[0])

    def read(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(image float32 (H, W), label uint8 (H, W)) of slice ``s``, both verified.

        Raises:
            ShardError: the slice's checksum does not match (one line naming shard, case and slice).
        """
        if self._raw is not None:
            raw, h, w = self._raw, self.shape[1], self.shape[2]
            offs, dtype, count = raw["image"]
            image = np.frombuffer(self._mm, dtype, count, offs[s]).reshape(h, w).copy()
            offs, dtype, count = raw["label"]
            label = np.frombuffer(self._mm, dtype, count, offs[s]).reshape(h, w).copy()
        else:
            try:
                image, label = self.image_ds[s], self.label_ds[s]
            except OSError as e:
                raise ShardError(f"{self._where}: slice {s} fails its HDF5 checksum or cannot be decoded "
                                 f"({str(e).splitlines()[0]}): the shard is corrupt, rerun preprocess") from None
        if self._sums is not None:
            want_img, want_lab = self._sums[s]
            if self._hash(image) != want_img or self._hash(label) != want_lab:
                which = "image" if self._hash(image) != want_img else "label"
                raise ShardError(f"{self._where}: slice {s}: {which} {self.checksum} checksum mismatch: the shard "
                                 "is corrupt, rerun preprocess to rewrite it")
        return image, label

    def verify_all(self) -> None:
        """Read and verify every slice (what ``validate_shard(deep=True)`` does for image and label).

        Raises:
            ShardError: a slice fails its checksum, or its image holds NaN/inf (a checksum only says the bytes
                are the ones written: a non-finite slice was written so and trains to NaN).
        """
        for s in range(len(self)):
            image, _ = self.read(s)
            if not np.isfinite(image).all():
                raise ShardError(f"{self._where}: slice {s}: the image holds non-finite values (NaN/inf): rerun "
                                 "preprocess (a case with non-finite intensities is refused there)")

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if getattr(self, "_f", None) is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "CaseShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- checking
def validate_shard(path: str | Path, case_id: Optional[str] = None, deep: bool = True,
                   params_sha256: Optional[str] = None) -> tuple[bool, str]:
    """Check one shard: it opens, is complete, has every dataset with fletcher32 and (format 2) a
    checksum per slice; ``deep``: every slice and every chunk verifies.

    Args:
        path: the shard file.
        case_id: the case it must hold (None: whatever it holds).
        deep: read everything back and verify it (uncompressed format 2: 0.16-0.27 s per GB from page cache,
            0.6-1.6 s under heavy load; bench/results/reader.json).
        params_sha256: when given, the preprocessing hash the shard must carry (the manifest's).

    Returns:
        (True, "") or (False, reason naming the file, the case and the problem).
    """
    path = Path(path)
    if not path.exists():
        return False, f"{path.name} does not exist"
    try:
        with h5py.File(path, "r") as f:
            groups = list(f.keys())
            if not groups:
                return False, f"{path.name} holds no case"
            if case_id is not None and case_id not in f:
                return False, f"{path.name} does not hold {case_id}"
            for gname in groups:
                why = _check_group(path, f[gname], deep, params_sha256)
                if why:
                    return False, why
    except ShardError as e:
        return False, str(e)
    except (OSError, KeyError, ValueError) as e:
        return False, f"{path.name}: {str(e).splitlines()[0]}"
    return True, ""


def _check_group(path: Path, g: h5py.Group, deep: bool, params_sha256: Optional[str]) -> str:
    """The reason the case group ``g`` of ``path`` is not valid, or ""."""
    where = f"{path.name}:{g.name.strip('/')}"
    if int(g.attrs.get("complete", 0)) != 1:
        return f"{where} is incomplete"
    version = int(g.attrs.get("schema_version", 1))
    needed = _REQUIRED + (("slice_checksums",) if version >= 2 else ())
    for name in needed:
        if name not in g:
            return f"{where} lacks dataset '{name}'"
    if g["image"].shape != g["label"].shape:
        return f"{where} image/label shapes differ"
    if params_sha256 is not None:
        have = g.attrs.get("params_sha256", "")
        have = have.decode() if isinstance(have, bytes) else str(have)
        if have != params_sha256:
            return (f"{where} was preprocessed with other parameters (params_sha256 {have[:12]}..., the manifest "
                    f"has {params_sha256[:12]}...): the folder mixes two preprocessing runs, rerun preprocess")
    why = _check_datasets(where, g, deep)
    if why:
        return why
    if deep and version >= 2:
        for part in (None, REFINE_GROUP) if REFINE_GROUP in g else (None,):
            with CaseShard(path, g.name.strip("/"), part) as shard:
                shard.verify_all()
    elif deep:
        _read_chunks(g["image"])
        _read_chunks(g["label"])
    return ""


def _check_datasets(where: str, g: h5py.Group, deep: bool) -> str:
    """Every dataset of ``g`` (and of its refine subgroup) has fletcher32; ``deep``: the small ones verify."""
    for name, ds in g.items():
        if isinstance(ds, h5py.Group):
            if name != REFINE_GROUP:
                return f"{where}/{name} is an unknown group"
            missing = [k for k in ("image", "label", "slice_checksums", "classes_present", "stack") if k not in ds]
            if missing:
                return f"{where}/{name} lacks dataset(s) {', '.join(missing)}"
            why = _check_datasets(f"{where}/{name}", ds, deep)
            if why:
                return why
            continue
        if not ds.fletcher32:
            return f"{where}/{name} has no fletcher32 checksum"
        if deep and name not in SLICE_DATASETS:
            ds[()]  # reading verifies the chunk's fletcher32
    return ""


def _read_chunks(ds: h5py.Dataset) -> None:
    for i in range(0, ds.shape[0], ds.chunks[0]):
        ds[i:i + ds.chunks[0]]  # noqa: B018 (reading verifies the chunk checksum)


def read_case_attrs(path: str | Path, case_id: str) -> dict:
    """The case group's attributes, JSON strings decoded."""
    out = {}
    with h5py.File(path, "r") as f:
        for k, v in f[case_id].attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, str):
                if v[:1] in ("[", "{") or v == "null":
                    try:
                        v = json.loads(v)
                    except json.JSONDecodeError:
                        pass
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, np.generic):
                v = v.item()
            out[k] = v
    return out
