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

Integrity: torch does not verify the bytes it reads (4 flipped bytes inside a tensor load as other weights), so
:func:`save` stores ``content_sha256``, a sha256 over every key, plain value and tensor byte of the state, and
:func:`load` recomputes it: a mismatch is a :class:`CheckpointError` naming the file. Checkpoints written before
the digest existed still load (one warning per process). ``load`` returns the state without the digest key.
"""
from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, TypedDict

import numpy as np
import torch

from hpc_dfs.errors import EXIT_DATA, HpcDfsError
from hpc_dfs.fsutil import atomic_path, clean_stale_tmp, write_bytes
from hpc_dfs.log import get_logger

__all__ = ["Checkpoint", "REQUIRED_KEYS", "OPTIONAL_KEYS", "INFERENCE_KEYS", "TENSOR_KEYS", "DIGEST_KEY",
           "CheckpointError",
           "capture_rng", "restore_rng", "save", "load", "read_meta", "copy_atomic", "prune_epoch_checkpoints",
           "epoch_path", "content_sha256", "CHECKPOINT_DIR", "LAST_NAME", "BEST_NAME", "checkpoint_dir",
           "last_path", "best_path"]

CHECKPOINT_DIR = "checkpoints"
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


def checkpoint_dir(run: str | Path) -> Path:
    """``RUN/checkpoints``.

    Args:
        run: the run folder (one stage's: ``RUN`` or ``RUN/locate``, ``RUN/refine``).
    """
    return Path(run) / CHECKPOINT_DIR


def last_path(run: str | Path) -> Path:
    """``RUN/checkpoints/last.pt``: written after every epoch and on preemption; what ``--resume`` reads.

    Args:
        run: the run folder.
    """
    return checkpoint_dir(run) / LAST_NAME


def best_path(run: str | Path) -> Path:
    """``RUN/checkpoints/best.pt``: the best validation score so far.

    Args:
        run: the run folder.
    """
    return checkpoint_dir(run) / BEST_NAME


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
    regions: Optional[dict]     # loss.regions' set (class indices, label per region); None: softmax (optional)


#: keys a checkpoint may lack: ``regions`` is absent from those written before region training
OPTIONAL_KEYS = ("regions",)
#: keys every checkpoint has (CONTRACTS.md section 3)
REQUIRED_KEYS = tuple(k for k in Checkpoint.__annotations__ if k not in OPTIONAL_KEYS)
#: what predicting needs (predict then checks preprocessing, classes and clinical itself)
INFERENCE_KEYS = ("model", "model_config")
#: the large tensor entries; :func:`read_meta` drops them
TENSOR_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng")
#: the key holding :func:`content_sha256` of the rest of the state (added by :func:`save`, removed by :func:`load`)
DIGEST_KEY = "content_sha256"

log = get_logger("hpc_dfs.checkpoint")
_warned_undigested = False


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


def content_sha256(state: Any) -> str:
    """sha256 over the structure of ``state``: keys, plain values (by type and ``repr``) and tensor bytes.

    Independent of the file's layout (zip offsets, pickle memo), so the loaded state gives the digest of the
    saved one exactly when every stored key, value and tensor byte came back unchanged.
    """
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    """Add one value to the digest, tagged by its type (so ``1``, ``1.0``, ``"1"`` and ``[1]`` differ)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    else:
        text = repr(obj).encode()
        h.update(f"V{type(obj).__name__}{len(text)}:".encode() + text)


def save(state: dict, path: str | Path) -> None:
    """Write ``state`` and its :func:`content_sha256` to ``path`` atomically (temp file, fsync, rename).

    Serialised in memory first, so a full disk is the plain ``write()`` failure of
    :func:`hpc_dfs.fsutil.write_bytes` (one line naming the file) and never a partial ``.pt``.

    Raises:
        CheckpointError: a required key is missing.
        DiskWriteError: the file system refused the write; names ``path``.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"refusing to write checkpoint {path}: keys {missing} missing")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path.parent)
    payload = {k: v for k, v in state.items() if k != DIGEST_KEY}
    payload[DIGEST_KEY] = content_sha256(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(path, buf.getbuffer())


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy a finished checkpoint to another name, atomically."""
    with atomic_path(dst, suffix=".pt") as tmp:
        shutil.copyfile(src, tmp)


def epoch_path(ckpt_dir: str | Path, epoch: int) -> Path:
    """``RUN/checkpoints/epoch_XXXX.pt``: the checkpoint kept for ``epoch``.

    Args:
        ckpt_dir: ``RUN/checkpoints``.
        epoch: the completed epochs it holds.
    """
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
        CheckpointError: the file is missing, truncated, corrupt (its contents do not give the stored
            ``content_sha256``) or foreign (not a torch file, not a dict, or without the keys); the message names
            the file and the problem.
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
    _verify_digest(state, path)
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks keys {missing}: not written by `hpc-dfs train`")
    _check_finite_weights(state, path)
    return state


def _check_finite_weights(state: dict, path: Path) -> None:
    """A checkpoint whose weights hold NaN or inf reads as a model but predicts nothing: refuse it.

    Raises:
        CheckpointError: names the file and the first tensor with a non-finite value.
    """
    weights = state.get("model")
    if not isinstance(weights, dict):
        return
    for name, t in weights.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int(t.numel() - int(torch.isfinite(t).sum()))
            raise CheckpointError(f"checkpoint {path} holds non-finite weights ({n_bad} NaN/inf values in {name}): "
                                  "the run that wrote it diverged; use an earlier checkpoint")


def _verify_digest(state: dict, path: Path) -> None:
    """Pop the stored digest and compare it with the contents; an old checkpoint without one gets one warning.

    Raises:
        CheckpointError: the digest differs (flipped bytes, a damaged copy); names the file.
    """
    global _warned_undigested
    if DIGEST_KEY not in state:
        if not _warned_undigested:
            log.warning("checkpoint %s has no %s (written before checkpoints carried one): its bytes are not "
                        "verified", path, DIGEST_KEY)
            _warned_undigested = True
        return
    want = state.pop(DIGEST_KEY)
    got = content_sha256(state)
    if want != got:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents hash to sha256 {got[:12]}..., not the "
                              f"{str(want)[:12]}... stored when it was written (flipped bytes or a damaged copy); "
                              "use another checkpoint, e.g. an epoch_XXXX.pt")


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
