"""Everything that can be wrong with a training run's inputs, checked on every rank before any work.

:func:`checked` runs a check on every rank and agrees on failures, so a bad setting stops the whole
job with one message (exit 2) instead of leaving the other ranks waiting in a collective.
:func:`prepare` returns the run's :class:`TrainPlan`: global batch, manifest, train/validation cases and,
on ``--resume``, the checkpoint rank 0 read.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from hpc_dfs import parallel
from hpc_dfs.config import ConfigError, to_dict
from hpc_dfs.config.train import TrainConfig
from hpc_dfs.data.reader import ShardError, ShardSet
from hpc_dfs.data.regions import resolve_regions
from hpc_dfs.errors import EXIT_ENV, EXIT_USAGE, HpcDfsError
from hpc_dfs.fsutil import sha256_file
from hpc_dfs.contracts import checkpoint as ckpt, shards as shards_contract

from hpc_dfs.models import SEGMENTATION_MODELS

__all__ = ["TrainPlan", "SetupError", "SEGMENTATION_MODELS", "checked", "engine_for", "prepare", "model_kwargs",
           "check_steps", "check_resume_fits", "resume_changes", "RESUME_MAY_CHANGE"]



class SetupError(HpcDfsError):
    """Raised on every rank after rank 0 has logged every rank's setup problems; carries the exit code."""

    code = EXIT_USAGE


@dataclass
class TrainPlan:
    """What :func:`prepare` found: the inputs of one run, the same on every rank (``state`` on rank 0 only)."""

    global_batch: int
    manifest: dict
    manifest_sha: str
    train_cases: list
    val_cases: list
    shardset: Any
    model_kwargs: dict
    state: Optional[dict] = None       # the checkpoint to resume from (rank 0)


def checked(log, what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank, agree on failures, and stop every rank if any failed.

    Raises:
        SetupError: on every rank when ``fn`` failed on any; rank 0 logged each distinct message once.
    """
    result, err, code = None, None, EXIT_USAGE
    try:
        result = fn()
    except (HpcDfsError, ShardError, FileNotFoundError, ValueError, KeyError) as e:
        err = str(e) or repr(e)
        code = e.code if isinstance(e, HpcDfsError) and e.code == EXIT_ENV else EXIT_USAGE  # a read-only --out: 4
    gathered = parallel.allgather_object((err, code))
    errors = [e for e, _ in gathered]
    if any(errors):
        if parallel.is_main():
            for msg in dict.fromkeys(e for e in errors if e):
                ranks = [r for r, e in enumerate(errors) if e == msg]
                where = "" if len(ranks) == len(errors) else f" (rank{'s' if len(ranks) > 1 else ''} " \
                                                             f"{', '.join(map(str, ranks))})"
                log.error("%s: %s%s", what, msg, where)
        raise SetupError(f"{what} (reported above)", code=max(c for e, c in gathered if e))
    return result


def engine_for(cfg: TrainConfig) -> str:
    """The engine this run uses (``--engine``, else ``$HPC_DFS_ENGINE``, else torch under torchrun, else horovod).

    Raises:
        ConfigError: an unknown engine name, or a Horovod-only feature (Adasum, timeline, autotune) under the
            torch engine: one line, before any rank starts work.
    """
    try:
        engine = parallel.requested_engine(cfg.engine)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg.check_engine(engine)
    return engine


def _check_settings(cfg: TrainConfig, world: int) -> None:
    if cfg.model.name not in SEGMENTATION_MODELS:
        raise ConfigError(f"model.name '{cfg.model.name}' is not a segmentation model (train one of "
                          f"{', '.join(SEGMENTATION_MODELS)}; clinical_gru is trained by `hpc-dfs clinical`)")
    if cfg.horovod.adasum and world & (world - 1):
        raise ConfigError(f"adasum needs a power-of-two number of ranks, got {world}")
    if cfg.horovod.adasum and cfg.amp in ("auto", "fp16") and torch.cuda.is_available():
        raise ConfigError("adasum cannot be combined with fp16 AMP: its GradScaler needs optimizer.skip_synchronize(), "
                          "which Horovod's Adasum optimizer does not support; use --amp bf16 or --amp off")
    if cfg.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            raise ConfigError("tensorboard=true but the tensorboard package is not installed "
                              "(pip install 'hpc-dfs[tensorboard]')") from None


def _read_shards(cfg: TrainConfig, shards_dir: Path) -> tuple[Any, Path, list, list]:
    if not shards_dir.is_dir():
        raise FileNotFoundError(f"shards folder {shards_dir} does not exist (write it with `hpc-dfs preprocess`)")
    manifest_path = shards_contract.manifest_path(shards_dir)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: {shards_dir} is not a finished `hpc-dfs preprocess` "
                                "output")
    # deep: every slice checksum before the first step (~0.2-0.4 s/GB from page cache, bench/results/reader.json),
    # so a corrupt shard stops the job here, named, not mid-epoch; also refuses shards of another preprocessing
    shardset = ShardSet(shards_dir).validate(deep=True)
    cases, fold = shardset.manifest["cases"], cfg.schedule.val_fold
    val_cases = [c for c in cases if c.get("fold") == fold]
    train_cases = [c for c in cases if c.get("fold") != fold]
    if not val_cases:
        folds = sorted({c.get("fold") for c in cases}, key=str)
        raise ConfigError(f"no case of {manifest_path} is in validation fold {fold} (folds present: {folds})")
    if not train_cases:
        raise ConfigError(f"every case of {manifest_path} is in validation fold {fold}: nothing to train on")
    return shardset, manifest_path, train_cases, val_cases


def _read_resume_state(cfg: TrainConfig, last: Path, manifest_path: Path, manifest_sha: str, manifest: dict) -> dict:
    """Rank 0: ``last.pt``, checked to fit these shards and model settings."""
    state = ckpt.load(last)
    if state["manifest_sha256"] != manifest_sha:
        raise ckpt.CheckpointError(
            f"{last} was trained on shards with manifest sha256 {state['manifest_sha256'][:12]}..., but "
            f"{manifest_path} has {manifest_sha[:12]}...: the shards changed since; resume with the same "
            "shards or start a new run")
    changed = resume_changes(state.get("config"), cfg)
    if changed:
        raise ConfigError(f"--resume: {changed[0]}{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''} "
                          f"differs from the run in {last}; a resumed run keeps its settings (the optimizer state "
                          "holds them): resume without the change, or start a new run with another --out")
    old_model, new_model = state["model_config"], model_kwargs(cfg, manifest)
    diff = sorted(k for k in set(old_model) | set(new_model) if old_model.get(k) != new_model.get(k))
    if diff:
        raise ckpt.CheckpointError(f"{last} holds a model with different settings ({', '.join(diff)}): "
                                   "resume with the same model settings")
    return state


#: settings a resumed run may change: how long and how often, workers, logging, threads, the gradient engine
#: (Horovod or torch.distributed: the same arithmetic, so a checkpoint resumes under either) and its transport
RESUME_MAY_CHANGE = ("schedule.epochs", "schedule.max_steps", "schedule.val_every", "data.num_workers",
                     "data.val_batch_size", "data.batch_size", "data.global_batch_size", "threads", "log_every",
                     "tensorboard", "engine", "horovod.", "checkpoint.", "amp", "deterministic", "model.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume_changes(stored: dict | None, cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` that differ from a checkpoint's stored ``config`` and may not change on resume.

    A resumed run restores the optimizer's and scheduler's state, which hold the learning rate, the optimizer's
    kind and its buffers: a changed ``optim.lr`` would be logged but not used, and ``--optimizer sgd`` on an Adam
    run cannot load at all. So those, the loss, the data sampling, augmentation and seed may not change.
    (``model.*`` is compared by :func:`_read_resume_state` against ``model_config``.)

    Args:
        stored: the checkpoint's ``config`` (either layout), or None for a checkpoint without one.
        cfg: this run's settings.

    Returns:
        ``["optim.lr 0.01 (the run's: 0.002)", ...]``; empty when nothing that matters changed.
    """
    if not isinstance(stored, dict):
        return []
    try:
        old = _flat(to_dict(TrainConfig.from_stored(stored)))
    except ConfigError:
        return []   # a config of a version this one cannot read: the model settings are still checked
    new = _flat(to_dict(cfg))
    return [f"{k} {new.get(k)!r} (the run's: {old.get(k)!r})" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not any(k == m or (m.endswith(".") and k.startswith(m))
                                                    for m in RESUME_MAY_CHANGE)]


def prepare(cfg: TrainConfig, shards_dir: Path, out: Path, resume: bool) -> TrainPlan:
    """Check the settings, the shards and (``resume``) ``last.pt``; returns the plan.

    Raises:
        ConfigError, CheckpointError, ShardError, FileNotFoundError: the first problem found, naming it.
    """
    world = parallel.size()
    gb = cfg.resolve_global_batch(world)
    _check_settings(cfg, world)
    shardset, manifest_path, train_cases, val_cases = _read_shards(cfg, shards_dir)
    manifest_sha = sha256_file(manifest_path)
    state = None
    last = ckpt.last_path(out)
    if resume:
        if not last.is_file():
            raise ckpt.CheckpointError(f"--resume given but {last} does not exist")
        if parallel.is_main():  # rank 0 reads it; the others get what they need by broadcast
            state = _read_resume_state(cfg, last, manifest_path, manifest_sha, shardset.manifest)
    elif last.exists():
        raise ConfigError(f"{last} exists: pass --resume to continue that run, or choose another --out")
    return TrainPlan(global_batch=gb, manifest=shardset.manifest, manifest_sha=manifest_sha, train_cases=train_cases,
                val_cases=val_cases, shardset=shardset, model_kwargs={}, state=state)


def model_kwargs(cfg: TrainConfig, manifest: dict) -> dict:
    """``build_model`` kwargs: the model settings plus the data's classes and clinical feature count.

    With ``loss.regions`` set, ``n_classes`` is the number of regions (the model's sigmoid outputs).

    Raises:
        ConfigError: ``model.n_clinical`` contradicts the shards, a clinical fusion has no clinical features, or
            ``loss.regions`` needs a class the shards lack.
    """
    kw = to_dict(cfg.model)
    kw["n_classes"] = len(manifest["preprocessing"]["classes"])
    regions = resolve_regions(cfg.loss.regions, manifest["preprocessing"]["classes"])
    if regions is not None:   # one sigmoid output per region
        kw["n_classes"] = len(regions["classes"])
    if cfg.stage == "refine" and "refine" not in manifest["preprocessing"]:
        raise ConfigError("--stage refine: the shards have no stage-2 windows (manifest preprocessing.refine); "
                          "preprocess again with refine.enabled=true (the default)")
    if kw["in_channels"] not in (1, cfg.context):
        raise ConfigError(f"model.in_channels = {kw['in_channels']} contradicts data.context = {cfg.context} "
                          "(the 2.5D slices are the channels; leave model.in_channels at 1)")
    kw["in_channels"] = cfg.context
    _check_slice_fits(cfg, manifest, int(kw.get("depth", 4)))
    n_features = int((manifest.get("clinical") or {}).get("n_features") or 0)
    if kw["n_clinical"] and kw["n_clinical"] != n_features:
        raise ConfigError(f"model.n_clinical = {kw['n_clinical']} but the shards have {n_features} clinical features "
                          "(leave model.n_clinical at 0 to take the manifest's)")
    kw["n_clinical"] = n_features
    if kw.get("name") == "dfs_fusion" and kw.get("fusion", "film") != "image" and kw["n_clinical"] < 1:
        raise ConfigError("the shards have no clinical features (manifest clinical.n_features = 0); "
                          "use --set model.fusion=image or preprocess with clinical records")
    return kw


def _check_slice_fits(cfg: TrainConfig, manifest: dict, depth: int) -> None:
    """The shards' slices must leave the model's deepest feature map at least 2x2 pixels.

    Raises:
        ConfigError: names the slice size, ``model.depth`` and what would fit.
    """
    pre = manifest["preprocessing"]
    size = (pre.get("refine") or {}).get("slice_size") if cfg.stage == "refine" else pre.get("slice_size")
    if size and min(int(v) for v in size) <= 2 ** depth:
        raise ConfigError(f"the shards' slices are {size[0]}x{size[1]}, but model.depth = {depth} pools them to "
                          f"1x1: preprocess with --slice-size larger than {2 ** depth} or lower model.depth")


def check_steps(steps: int, natural: int, n_slices: int, gb: int) -> None:
    """``steps_per_epoch`` must fit one pass over the training slices."""
    if natural < 1:
        raise ConfigError(f"the training set has {n_slices} slices, fewer than one global batch of {gb}")
    if steps > natural:
        raise ConfigError(f"steps_per_epoch {steps} exceeds the {natural} global batches of one pass over the "
                          f"{n_slices} training slices")


def check_resume_fits(state: dict | None, steps_per_epoch: int, gb: int, out: Path) -> None:
    """On rank 0 (which read last.pt): the checkpoint's step must fall inside its epoch at this run's settings."""
    if state is None:
        return
    epoch, step = int(state["epoch"]), int(state["step"])
    if not 0 <= step - epoch * steps_per_epoch <= steps_per_epoch:
        raise ckpt.CheckpointError(
            f"{ckpt.last_path(out)} is at epoch {epoch}, step {step}, which does not fit {steps_per_epoch} "
            f"steps per epoch (global batch {gb}): resume with the run's batch and steps_per_epoch settings")
