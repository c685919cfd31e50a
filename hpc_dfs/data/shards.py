"""HDF5 shards: writing one case atomically, and verifying shards (checksums included).

Layout (``hpc_dfs/CONTRACTS.md`` section 2): one group ``/<case_id>/`` per case with datasets
``image`` float32 (n, H, W), ``label`` uint8 (n, H, W), ``classes_present`` uint8 (n, C),
``clinical`` float32 (F,) and ``fg_samples`` float32 (k,) (the case's fingerprint sample, so a
resumed run need not decode the NIfTI again), plus the attributes listed in the contract.

Storage choices:

- **chunks of one slice** ``(1, H, W)``: the reader fetches one slice per item, so it decompresses
  exactly the bytes it needs;
- **LZF** by default: the reader is the hot path of training and LZF decodes faster than gzip
  while still shrinking CT slices (air and padding areas) ~4-5x; a byte-shuffle filter before it
  gave ~10% smaller files but halved the read rate, so it is used with gzip only
  (``compression="gzip"``, level 1-9: smaller files, slower reads; see ``bench/bench_reader.py``);
- **fletcher32 on every dataset**: HDF5 verifies each chunk's checksum when it is read, so
  :func:`validate_shard` reads every chunk and a flipped bit anywhere fails loudly;
- ``track_times=False`` so that two runs write the same bytes for the same arrays.

A shard is written under a ``.tmp-*`` name (``hpc_dfs.fsutil.atomic_path``) and renamed only
after it is closed and fsync'ed, with the attribute ``complete=1`` set last: a process killed at
any moment leaves either no file, a ``.tmp-*`` file no reader opens, or a complete shard.

Usage::

    write_case_shard(out / "shard-case_00002.h5", "case_00002", image, label, classes_present,
                     clinical, fg_samples, attrs, compression="lzf")
    ok, why = validate_shard(out / "shard-case_00002.h5")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from hpc_dfs.fsutil import atomic_path

__all__ = ["SLICE_DATASETS", "shard_name", "write_case_shard", "validate_shard", "read_case_attrs",
           "dataset_filters"]

SLICE_DATASETS = ("image", "label")


def shard_name(case_id: str) -> str:
    """Shard file name of a case (one case per shard: resumable and rank-independent)."""
    return f"shard-{case_id}.h5"


def _filters(compression: str, level: int) -> dict:
    if compression == "lzf":
        return {"compression": "lzf"}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": int(level), "shuffle": True}
    if compression == "none":
        return {}
    raise ValueError(f"unknown compression '{compression}' (lzf, gzip or none)")


def write_case_shard(path: str | Path, case_id: str, image: np.ndarray, label: np.ndarray,
                     classes_present: np.ndarray, clinical: np.ndarray, fg_samples: np.ndarray, attrs: dict,
                     compression: str = "lzf", level: int = 1) -> Path:
    """Write one case's shard atomically; ``attrs`` values are numbers, strings, arrays or JSON-able objects."""
    path = Path(path)
    filt = _filters(compression, level)
    n, h, w = image.shape
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            g = f.create_group(case_id)
            common = dict(fletcher32=True, track_times=False, **filt)
            g.create_dataset("image", data=image.astype(np.float32, copy=False), chunks=(1, h, w), **common)
            g.create_dataset("label", data=label.astype(np.uint8, copy=False), chunks=(1, h, w), **common)
            g.create_dataset("classes_present", data=classes_present.astype(np.uint8, copy=False),
                             chunks=classes_present.shape, **common)
            # chunked datasets need at least one element per dimension: an empty clinical vector
            # (clinical=none) is stored as shape (0,) with a fixed 1-element chunk and maxshape
            clin = np.asarray(clinical, dtype=np.float32).reshape(-1)
            g.create_dataset("clinical", data=clin, chunks=(max(1, clin.size),), maxshape=(None,), **common)
            fgs = np.asarray(fg_samples, dtype=np.float32).reshape(-1)
            g.create_dataset("fg_samples", data=fgs, chunks=(max(1, min(fgs.size, 1 << 16)),), maxshape=(None,),
                             **common)
            for k, v in attrs.items():
                g.attrs[k] = _attr(v)
            g.attrs["complete"] = 1  # last: a reader seeing this knows every dataset was written
    return path


def _attr(v):
    if isinstance(v, (dict, list, tuple)) and not (isinstance(v, (list, tuple)) and v and
                                                    all(isinstance(x, (int, float)) for x in v)):
        return json.dumps(v)
    if v is None:
        return "null"
    return v


def dataset_filters(ds: h5py.Dataset) -> dict:
    return {"chunks": ds.chunks, "compression": ds.compression, "shuffle": ds.shuffle, "fletcher32": ds.fletcher32}


def validate_shard(path: str | Path, case_id: Optional[str] = None, deep: bool = True) -> tuple[bool, str]:
    """(True, "") when the shard opens, is complete, every dataset has fletcher32, and (deep)
    every chunk reads back with a valid checksum; else (False, reason)."""
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
                g = f[gname]
                if int(g.attrs.get("complete", 0)) != 1:
                    return False, f"{path.name}:{gname} is incomplete"
                for name in ("image", "label", "classes_present", "clinical", "fg_samples"):
                    if name not in g:
                        return False, f"{path.name}:{gname} lacks dataset '{name}'"
                for name, ds in g.items():
                    if not ds.fletcher32:
                        return False, f"{path.name}:{gname}/{name} has no fletcher32 checksum"
                    if deep:
                        if ds.chunks and ds.ndim >= 1 and ds.shape[0] > 0:
                            for i in range(0, ds.shape[0], ds.chunks[0]):
                                ds[i:i + ds.chunks[0]]  # noqa: B018 (reading verifies the chunk checksum)
                        else:
                            ds[()]
                if g["image"].shape != g["label"].shape:
                    return False, f"{path.name}:{gname} image/label shapes differ"
    except (OSError, KeyError, ValueError) as e:
        return False, f"{path.name}: {e}"
    return True, ""


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
