"""The SHARDS/ folder that ``preprocess`` writes and ``train`` reads (``hpc_dfs/CONTRACTS.md`` section 2).

    SHARDS/manifest.json           MANIFEST_NAME, :class:`Manifest`, :func:`write_manifest` / :func:`read_manifest`
    SHARDS/clinical_pipeline.json  CLINICAL_PIPELINE_NAME (the fitted clinical feature pipeline)
    SHARDS/shard-<case_id>.h5      :func:`shard_name`, format :data:`SHARD_SCHEMA_VERSION` (hpc_dfs.data.shards)

The manifest is written last, atomically, by rank 0: a folder without one is unfinished.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, TypedDict

from hpc_dfs.errors import EXIT_DATA, HpcDfsError
from hpc_dfs.fsutil import write_json

__all__ = ["MANIFEST_NAME", "CLINICAL_PIPELINE_NAME", "MANIFEST_SCHEMA_VERSION", "SHARD_SCHEMA_VERSION",
           "ShardError", "Manifest", "ManifestCase", "shard_name", "manifest_path", "write_manifest",
           "read_manifest"]

MANIFEST_NAME = "manifest.json"
CLINICAL_PIPELINE_NAME = "clinical_pipeline.json"
#: manifest layout written and read by this code
MANIFEST_SCHEMA_VERSION = 1
#: shard format written by this code; 1 = before ``slice_checksums`` (read through h5py, fletcher32 only)
SHARD_SCHEMA_VERSION = 2


class ShardError(HpcDfsError):
    """A shard or the shards folder is missing, incomplete, inconsistent or corrupt; the message says which file.

    A ``ShardError`` raised inside a DataLoader worker is re-raised by torch in the main process with
    the worker's traceback appended to the message; the constructor keeps only the original line.
    """

    code = EXIT_DATA

    def __init__(self, message: str = "", code: Optional[int] = None) -> None:
        if "\nOriginal Traceback" in message:  # torch's ExceptionWrapper.reraise: keep the one line
            last = [ln for ln in message.splitlines() if ln.strip()][-1]
            message = last.split("ShardError: ", 1)[-1]
        super().__init__(message, code)


class ManifestCase(TypedDict, total=False):
    """One row of the manifest's ``cases``."""

    case_id: str
    shard: str
    n_slices: int
    fold: int
    risk_label: Optional[int]
    n_voxels_in: int
    slices_with: dict[str, int]
    n_refine_slices: int
    n_refine_windows: int
    refine_slices_with: dict[str, int]


class Manifest(TypedDict, total=False):
    """``manifest.json``: what a shards folder holds and how it was made."""

    schema_version: int
    hpc_dfs_version: str
    created: str
    dataset: str
    source: str
    shards: list[str]
    cases: list[ManifestCase]
    n_folds: int
    fingerprint: dict[str, Any]
    preprocessing: dict[str, Any]
    clinical: dict[str, Any]
    config: dict[str, Any]
    failed: list[dict[str, str]]
    skipped_unlabelled: list[str]
    world_size: int
    params_sha256: str


def shard_name(case_id: str) -> str:
    """Shard file name of a case (one case per shard: resumable and rank-independent).

    Args:
        case_id: the case folder name.
    """
    return f"shard-{case_id}.h5"


def manifest_path(shards_dir: str | Path) -> Path:
    """``SHARDS/manifest.json``.

    Args:
        shards_dir: the shards folder.
    """
    return Path(shards_dir) / MANIFEST_NAME


def write_manifest(shards_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (the last file preprocess writes); returns its path.

    Args:
        shards_dir: the shards folder.
        manifest: the manifest, ``schema_version`` :data:`MANIFEST_SCHEMA_VERSION`.

    Raises:
        hpc_dfs.fsutil.DiskWriteError: the file cannot be written (disk full, read-only).
    """
    path = manifest_path(shards_dir)
    write_json(path, manifest)
    return path


def read_manifest(shards_dir: str | Path) -> Manifest:
    """The manifest of a finished shards folder, checked to be of the layout this code reads.

    Args:
        shards_dir: the shards folder.

    Raises:
        ShardError: no manifest (an unfinished or wrong folder), not JSON, or another ``schema_version``.
    """
    root = Path(shards_dir)
    path = manifest_path(root)
    if not path.exists():
        raise ShardError(f"{path} does not exist: run `hpc-dfs preprocess --out {root}` first "
                         f"(an interrupted run writes no manifest)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ShardError(f"{path}: schema_version {manifest.get('schema_version')!r}, this hpc-dfs reads "
                         f"{MANIFEST_SCHEMA_VERSION}")
    return manifest
