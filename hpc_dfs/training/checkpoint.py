"""Checkpoints of a training run: atomic, rank-0-written, loadable with ``weights_only=True``.

Layout (CONTRACTS.md section 3)::

    RUN/checkpoints/last.pt          # after every epoch and on preemption; what --resume reads
    RUN/checkpoints/best.pt          # best validation score so far
    RUN/checkpoints/epoch_XXXX.pt    # the last ``keep_last`` epochs

Everything stored is a tensor or a plain Python type (dict, list, str, int, float, bool, None), so
``torch.load(path, weights_only=True)`` -- which refuses arbitrary pickles -- loads it. RNG states are
stored as tensors and lists for the same reason.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpc_dfs.fsutil import atomic_path, clean_stale_tmp

__all__ = ["REQUIRED_KEYS", "CheckpointError", "capture_rng", "restore_rng", "save", "load", "copy_atomic",
           "prune_epoch_checkpoints", "epoch_path"]

#: keys every checkpoint has (CONTRACTS.md section 3)
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config", "model_config",
                 "preprocessing", "clinical", "classes", "manifest_sha256", "metrics", "hpc_dfs_version",
                 "world_size")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit this run; the message names the file."""


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


def load(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; one clear error if it is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read with torch.load(weights_only=True): {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of training state")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks keys {missing}: not written by `hpc-dfs train`")
    return state
