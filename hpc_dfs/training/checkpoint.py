"""Checkpoints of a training run: atomic, rank-0-written, loadable with ``weights_only=True``.

Layout (CONTRACTS.md section 3)::

    RUN/checkpoints/last.pt          # after every epoch and on preemption; what --resume reads
    RUN/checkpoints/best.pt          # best validation score so far
    RUN/checkpoints/epoch_XXXX.pt    # the last ``keep_last`` epochs

Everything stored is a tensor or a plain Python type (dict, list, str, int, float, bool, None), so
``torch.load(path, weights_only=True)`` -- which refuses arbitrary pickles -- loads it. RNG states are
stored as tensors and lists for the same reason.

The schema is :class:`Checkpoint` (a TypedDict). This module is the only place that calls ``torch.load``
(``tests/unit/test_architecture.py``): ``train --resume`` reads with :func:`load` (every key),
``predict`` with ``load(path, require=INFERENCE_KEYS)`` and ``report`` with :func:`read_meta`. A bad
file -- missing, truncated, not a torch file, not a dict, or a dict without our keys -- raises the same
:class:`CheckpointError` everywhere, naming the file and the problem.

``config`` is the run's :class:`~hpc_dfs.config.train.TrainConfig` as a dict, kept for the record (report
shows it; nothing rebuilds a run from it): checkpoints written before the config had sections hold a flat
dict there and still load for predict and report; ``TrainConfig.from_stored`` reads either layout.
``model_config`` is what rebuilds the network.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, TypedDict

import numpy as np
import torch

from hpc_dfs.errors import EXIT_DATA, HpcDfsError
from hpc_dfs.fsutil import atomic_path, clean_stale_tmp

__all__ = ["Checkpoint", "REQUIRED_KEYS", "INFERENCE_KEYS", "TENSOR_KEYS", "CheckpointError", "capture_rng",
           "restore_rng", "save", "load", "read_meta", "copy_atomic", "prune_epoch_checkpoints", "epoch_path"]


class Checkpoint(TypedDict):
    """What ``hpc-dfs train`` writes to ``RUN/checkpoints/*.pt`` (CONTRACTS.md section 3)."""

    model: dict                 # state_dict of the network
    optimizer: dict             # state_dict of the (Horovod-wrapped) optimizer
    scheduler: Optional[dict]   # LR scheduler state, None without a schedule
    scaler: Optional[dict]      # AMP GradScaler state, None without fp16
    epoch: int                  # completed epochs
    step: int                   # optimizer steps in all
    rng: list                   # per rank: capture_rng()
    config: dict                # the TrainConfig as a dict (sections; old runs: flat)
    model_config: dict          # build_model(**model_config) rebuilds the network
    preprocessing: dict         # the manifest's preprocessing parameters
    clinical: dict              # fitted clinical pipeline, feature names, n_features
    classes: list               # class names, background first
    manifest_sha256: str        # of the shards' manifest.json
    metrics: dict               # validation metrics of this epoch, best_score, best_epoch
    hpc_dfs_version: str
    world_size: int


#: keys every checkpoint has (CONTRACTS.md section 3)
REQUIRED_KEYS = tuple(Checkpoint.__annotations__)
#: what predicting needs (predict then checks preprocessing, classes and clinical itself)
INFERENCE_KEYS = ("model", "model_config")
#: the large tensor entries; :func:`read_meta` drops them
TENSOR_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng")


class CheckpointError(HpcDfsError):
    """A checkpoint is missing, unreadable or does not fit this run; the message names the file."""

    code = EXIT_DATA


def capture_rng() -> dict:
    """This process's RNG states (torch, CUDA, numpy, Python) as tensors and plain types."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }
    return state


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def save(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"refusing to write checkpoint {path}: keys {missing} missing")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path.parent)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy a finished checkpoint to another name, atomically."""
    with atomic_path(dst, suffix=".pt") as tmp:
        shutil.copyfile(src, tmp)


def epoch_path(ckpt_dir: str | Path, epoch: int) -> Path:
    return Path(ckpt_dir) / f"epoch_{epoch:04d}.pt"


def prune_epoch_checkpoints(ckpt_dir: str | Path, keep: int) -> list[Path]:
    """Delete ``epoch_XXXX.pt`` files beyond the newest ``keep``; returns the deleted paths."""
    files = sorted((p for p in Path(ckpt_dir).glob("epoch_*.pt") if re.fullmatch(r"epoch_\d+\.pt", p.name)),
                   key=lambda p: int(p.stem.split("_")[1]))
    doomed = files[:-keep] if keep > 0 else files
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def load(path: str | Path, map_location: Any = "cpu", require: Iterable[str] = REQUIRED_KEYS) -> Checkpoint:
    """Load a checkpoint with ``weights_only=True`` and check it has the ``require``d keys.

    Args:
        path: the ``.pt`` file.
        map_location: as for ``torch.load``.
        require: keys that must be present (default: all of :data:`REQUIRED_KEYS`, as ``--resume`` needs).

    Raises:
        CheckpointError: the file is missing, truncated or foreign (not a torch file, not a dict, or without the
            keys); the message names the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read with torch.load(weights_only=True) (truncated or "
                              f"not a torch file?): {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of training state: "
                              "not written by `hpc-dfs train`")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks keys {missing}: not written by `hpc-dfs train`")
    return state


def read_meta(path: str | Path) -> dict:
    """Everything of a checkpoint except the tensors (model, optimizer, RNG states), plus ``n_parameters``.

    Raises:
        CheckpointError: as :func:`load` (only ``model`` is required).
    """
    state = load(path, require=("model",))
    meta = {k: v for k, v in state.items() if k not in TENSOR_KEYS}
    if isinstance(state.get("model"), dict):
        meta["n_parameters"] = int(sum(t.numel() for t in state["model"].values() if hasattr(t, "numel")))
    return meta
