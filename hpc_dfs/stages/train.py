"""Train the DFS fusion model data-parallel with Horovod ring-allreduce (1..N ranks, CPU or GPU).

The same command runs as one process, under ``horovodrun`` (Gloo or MPI), under ``mpirun`` and under
``srun`` in an sbatch allocation::

    hpc-dfs train --shards data/shards --out runs/r1                          # one process
    horovodrun -np 4 --gloo hpc-dfs train --shards data/shards --out runs/r1  # Gloo controller
    mpirun -np 4 hpc-dfs train --shards data/shards --out runs/r1             # MPI controller
    srun --mpi=pmix hpc-dfs train --shards data/shards --out runs/r1          # inside sbatch (slurm/)
    hpc-dfs train --shards data/shards --out runs/r1 --resume                 # continue from last.pt
    hpc-dfs train --shards data/shards --out runs/r1 --auto-resume            # resume if last.pt exists (sbatch)

Small settings for a laptop or CI (2 ranks on 2 cores; on 64x64 phantom shards of 8 cases this
reaches kidney Dice ~0.85 in about 75 s)::

    mpirun --allow-run-as-root --oversubscribe -np 2 hpc-dfs train --shards S --out R --epochs 30 \\
        --batch-size 8 --lr 0.002 --num-workers 0 --set model.base_channels=8 --set model.norm=instance

On CPU prefer ``model.norm=instance`` (batch-independent): the rank-synchronised BatchNorm adds two
small blocking allreduces per BatchNorm layer and step, which on CPU cost more than they buy
(2 ranks on 2 cores: 1.46x the 1-rank throughput with it, 1.9-2.0x with instance norm).

The DFS algorithm, step by step, is the loop below:

1. the training slices are partitioned over the P ranks: every global batch (drawn from
   ``(seed, epoch)``, independent of P) is cut into P contiguous shares;
2. each rank runs the segmentation, clinical and fusion forward pass and the loss on its share;
   the loss's sufficient statistics are summed over ranks first (a differentiable allreduce), so the
   loss is the global batch's loss on every rank;
3. gradients are averaged by Horovod's ring-allreduce (``hvd.DistributedOptimizer``);
4. weights are broadcast from rank 0 at the start, weights and optimizer state on resume.

Why the gradients equal the single-process ones: every rank holds the same loss ``L`` of the global
batch. Horovod's sum-allreduce has a sum-allreduce as its backward, so rank r's gradient is
``P * dL/dS * dS_r/dtheta`` (S = the summed statistics, S_r = rank r's share). Averaging over the P
ranks gives ``sum_r dL/dS * dS_r/dtheta = dL/dtheta``: no extra scaling. BatchNorm layers are
replaced by a rank-synchronised batch norm built the same way (:mod:`hpc_dfs.dist.syncbn`), so a
2-rank run reproduces a 1-rank run with the same global batch (``tests/distributed/test_train_distributed.py``).

Exit status: 0 done; 2 bad configuration or data (reported before any work);
75 (:data:`~hpc_dfs.config.train.EXIT_PREEMPTED`) stopped by SIGUSR1/SIGTERM after writing
``last.pt`` -- requeue with ``--resume`` (or always pass ``--auto-resume``); 1 any other error (the job is aborted on all ranks).

Outputs (CONTRACTS.md section 3): ``RUN/checkpoints/{last,best,epoch_XXXX}.pt``, ``RUN/metrics.jsonl``,
``RUN/curves.png``, ``RUN/config.toml``, and optionally ``RUN/tb/`` (TensorBoard) and a Horovod timeline.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hpc_dfs import __version__, dist
from hpc_dfs.config import ConfigError, add_arguments as add_config_arguments, from_args, to_dict
from hpc_dfs.config.train import EXIT_PREEMPTED, TrainConfig
from hpc_dfs.data.augment import SliceAugmenter, derive_seed
from hpc_dfs.data.reader import GlobalBatchSampler, ShardError, ShardSet, SliceDataset, partition_balanced
from hpc_dfs.fsutil import sha256_file, write_text
from hpc_dfs.training import checkpoint as ckpt
from hpc_dfs.training.metrics import CaseAccumulator, MetricsLog, clean, score, summarise
from hpc_dfs.training.signals import Preemption
from hpc_dfs.log import get_logger

__all__ = ["add_arguments", "main", "train", "EXIT_PREEMPTED", "EXIT_BAD_CONFIG"]

EXIT_BAD_CONFIG = 2
SEGMENTATION_MODELS = ("dfs_fusion", "rusp_net", "rusp_net_dw", "unet")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, required=True, help="SHARDS folder written by `hpc-dfs preprocess`")
    parser.add_argument("--out", type=Path, required=True, help="RUN folder (checkpoints, metrics, curves)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue from RUN/checkpoints/last.pt if it exists, else start (for requeued jobs)")
    add_config_arguments(parser, TrainConfig)


def main(args: argparse.Namespace) -> int:
    log = get_logger("hpc_dfs.train")
    try:
        cfg = from_args(TrainConfig, args)
    except ConfigError as e:
        log.error("bad configuration: %s", e)
        return EXIT_BAD_CONFIG
    # Horovod reads these at init: stall shutdown turns a dead or hung rank into an error, not a hang.
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(5, cfg.stall_timeout // 2)))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(cfg.stall_timeout))
    if not torch.cuda.is_available():
        # CPU ranks share the node's cores with MPI's progress loop and Horovod's background thread: let idle
        # waits yield the core (measured, 2 ranks on 2 cores, instance norm: 1.7-1.8x the 1-rank throughput
        # instead of 1.1-1.3x with busy polling); a 1 ms cycle keeps the many small blocking allreduces of
        # the CPU SyncBatchNorm short. A value set in the environment wins.
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "1")
    if cfg.timeline:   # Horovod's timeline (chrome://tracing JSON), written by rank 0 from init to exit
        Path(cfg.timeline).resolve().parent.mkdir(parents=True, exist_ok=True)
        os.environ["HOROVOD_TIMELINE"] = str(Path(cfg.timeline).resolve())
    if cfg.autotune:
        os.environ["HOROVOD_AUTOTUNE"] = "1"
        if cfg.autotune_log:
            os.environ["HOROVOD_AUTOTUNE_LOG"] = str(cfg.autotune_log)
    dist.init()
    log = get_logger("hpc_dfs.train")
    try:
        resume = args.resume or (args.auto_resume and (Path(args.out) / "checkpoints" / "last.pt").is_file())
        return train(cfg, args.shards, args.out, resume=resume)
    except SetupError as e:
        return e.code
    except Exception:
        log.exception("training failed")
        if dist.size() > 1:
            dist.abort(1)  # the other ranks would wait forever in their next collective
        return 1


class SetupError(Exception):
    """Raised after every rank has reported its setup problems; carries the exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# ============================================================================ setup checks
def _checked(log, what: str, fn):
    """Run ``fn`` on every rank, agree on failures, and stop every rank if any failed.

    Bad configuration must stop the whole job before any collective of the training loop; a rank that
    raised alone would leave the others waiting. Each rank's message is logged by rank 0.
    """
    result, err = None, None
    try:
        result = fn()
    except (ConfigError, ckpt.CheckpointError, ShardError, FileNotFoundError, ValueError, KeyError) as e:
        err = str(e) or repr(e)
    errors = dist.allgather_object(err)
    if any(errors):
        if dist.is_main():
            for msg in dict.fromkeys(e for e in errors if e):
                ranks = [r for r, e in enumerate(errors) if e == msg]
                where = "" if len(ranks) == len(errors) else f" (rank{'s' if len(ranks) > 1 else ''} " \
                                                             f"{', '.join(map(str, ranks))})"
                log.error("%s: %s%s", what, msg, where)
        raise SetupError(EXIT_BAD_CONFIG)
    return result


def _prepare(cfg: TrainConfig, shards_dir: Path, out: Path, resume: bool) -> dict:
    """Everything that can be wrong with the inputs, checked before any work. Returns the plan."""
    world = dist.size()
    gb = cfg.resolve_global_batch(world)
    if cfg.model.name not in SEGMENTATION_MODELS:
        raise ConfigError(f"model.name '{cfg.model.name}' is not a segmentation model (train one of "
                          f"{', '.join(SEGMENTATION_MODELS)}; clinical_gru is trained by `hpc-dfs clinical`)")
    if cfg.adasum and world & (world - 1):
        raise ConfigError(f"adasum needs a power-of-two number of ranks, got {world}")
    if cfg.adasum and cfg.amp in ("auto", "fp16") and torch.cuda.is_available():
        raise ConfigError("adasum cannot be combined with fp16 AMP: its GradScaler needs optimizer.skip_synchronize(), "
                          "which Horovod's Adasum optimizer does not support; use --amp bf16 or --amp off")
    if cfg.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            raise ConfigError("tensorboard=true but the tensorboard package is not installed "
                              "(pip install 'hpc-dfs[tensorboard]')") from None
    if not shards_dir.is_dir():
        raise FileNotFoundError(f"shards folder {shards_dir} does not exist (write it with `hpc-dfs preprocess`)")
    manifest_path = shards_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: {shards_dir} is not a finished `hpc-dfs preprocess` "
                                "output")
    # deep: every slice checksum before the first step (0.16-0.27 s/GB from page cache, bench/results/reader.json),
    # so a corrupt shard stops the job here, named, not mid-epoch; also refuses shards of another preprocessing
    shardset = ShardSet(shards_dir).validate(deep=True)
    manifest = shardset.manifest
    cases = manifest["cases"]
    val_cases = [c for c in cases if c.get("fold") == cfg.val_fold]
    train_cases = [c for c in cases if c.get("fold") != cfg.val_fold]
    if not val_cases:
        folds = sorted({c.get("fold") for c in cases}, key=str)
        raise ConfigError(f"no case of {manifest_path} is in validation fold {cfg.val_fold} (folds present: {folds})")
    if not train_cases:
        raise ConfigError(f"every case of {manifest_path} is in validation fold {cfg.val_fold}: nothing to train on")
    manifest_sha = sha256_file(manifest_path)
    state = None
    last = out / "checkpoints" / "last.pt"
    if resume:
        if not last.is_file():
            raise ckpt.CheckpointError(f"--resume given but {last} does not exist")
        if dist.is_main():  # rank 0 reads it; the others get what they need by broadcast
            state = ckpt.load(last)
            if state["manifest_sha256"] != manifest_sha:
                raise ckpt.CheckpointError(
                    f"{last} was trained on shards with manifest sha256 {state['manifest_sha256'][:12]}..., but "
                    f"{manifest_path} has {manifest_sha[:12]}...: the shards changed since; resume with the same "
                    "shards or start a new run")
            old_model = state["model_config"]
            new_model = _model_kwargs(cfg, manifest)
            diff = sorted(k for k in set(old_model) | set(new_model) if old_model.get(k) != new_model.get(k))
            if diff:
                raise ckpt.CheckpointError(f"{last} holds a model with different settings ({', '.join(diff)}): "
                                           "resume with the same model settings")
    elif last.exists():
        raise ConfigError(f"{last} exists: pass --resume to continue that run, or choose another --out")
    return {"global_batch": gb, "manifest": manifest, "manifest_sha": manifest_sha, "train_cases": train_cases,
            "val_cases": val_cases, "state": state, "shardset": shardset}


def _model_kwargs(cfg: TrainConfig, manifest: dict) -> dict:
    """``build_model`` kwargs: the model settings plus the data's classes and clinical feature count."""
    kw = to_dict(cfg.model)
    kw["n_classes"] = len(manifest["preprocessing"]["classes"])
    n_features = int((manifest.get("clinical") or {}).get("n_features") or 0)
    if kw["n_clinical"] and kw["n_clinical"] != n_features:
        raise ConfigError(f"model.n_clinical = {kw['n_clinical']} but the shards have {n_features} clinical features "
                          "(leave model.n_clinical at 0 to take the manifest's)")
    kw["n_clinical"] = n_features
    if kw.get("name") == "dfs_fusion" and kw.get("fusion", "film") != "image" and kw["n_clinical"] < 1:
        raise ConfigError("the shards have no clinical features (manifest clinical.n_features = 0); "
                          "use --set model.fusion=image or preprocess with clinical records")
    return kw


# ============================================================================ small helpers
def _forward(model, uses_clinical: bool, image, clinical) -> dict:
    out = model(image, clinical) if uses_clinical else model(image)
    return out if isinstance(out, dict) else {"seg_logits": out}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _warmup_factor(step: int, warmup_steps: int, scale: float) -> float:
    """Linear ramp from the unscaled lr (1/scale of the scaled one) to the scaled lr (Goyal et al.)."""
    if scale <= 1.0 or warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return 1.0 / scale + (1.0 - 1.0 / scale) * step / warmup_steps


class _Timer:
    """Accumulates wall time spent inside ``with timer:`` blocks."""

    def __init__(self) -> None:
        self.total = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._t0


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


# ============================================================================ training
def train(cfg: TrainConfig, shards_dir: Path, out: Path, resume: bool = False) -> int:
    log = get_logger("hpc_dfs.train")
    rank, world = dist.rank(), dist.size()
    shards_dir, out = Path(shards_dir), Path(out)

    # ---- 1. check everything before any work
    plan = _checked(log, "bad configuration", lambda: _prepare(cfg, shards_dir, out, resume))
    manifest = plan["manifest"]
    model_kwargs = _checked(log, "bad configuration", lambda: _model_kwargs(cfg, manifest))
    gb, k = plan["global_batch"], cfg.backward_passes_per_step
    micro_global = gb // k            # samples per backward pass, all ranks together
    local_batch = micro_global // world

    # ---- 2. threads, device, determinism
    threads = dist.configure_threads(cfg.threads or None)
    device = dist.device()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    amp_dtype = None
    if device.type == "cuda" and cfg.amp != "off":
        amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    elif cfg.amp in ("fp16", "bf16"):
        log.warning("amp=%s asked for, but there is no CUDA device: training in fp32", cfg.amp)
    if dist.is_main():
        log.info("job: %s", dist.topology())
        log.info("%d rank(s) x %d thread(s) on %s; global batch %d = %d ranks x %d per rank x %d backward pass(es)",
                 world, threads, device, gb, world, local_batch, k)

    # ---- 3. model, loss, optimizer (same init on every rank; broadcast below anyway)
    from hpc_dfs.models import DFSLoss, build_model, count_parameters
    _seed_everything(cfg.seed)
    model = build_model(**model_kwargs)
    if cfg.sync_bn:
        model = dist.convert_sync_batchnorm(model)
    model.to(device)
    uses_clinical = model_kwargs["name"] == "dfs_fusion"
    n_classes = model_kwargs["n_classes"]
    # rank-distinct dropout streams; the data order and augmentation never use these
    torch.manual_seed(_seed(cfg.seed, rank))
    reduce_fn = None
    ar_timer = _Timer()
    if world > 1 and not cfg.adasum:   # Adasum combines rank-local gradients by design: local loss
        def reduce_fn(t):
            with ar_timer:
                return dist.allreduce(t, op="sum")
    loss_kw = dict(n_classes=n_classes, dice_weight=cfg.dice_weight, ce_weight=cfg.ce_weight,
                   risk_weight=cfg.risk_weight)
    loss_fn = DFSLoss(reduce_fn=reduce_fn, **loss_kw)
    val_loss_fn = DFSLoss(**loss_kw)   # per case, no reduction: cases are split over ranks

    lr_scale = cfg.lr_scale(world)
    peak_lr = cfg.base_lr * lr_scale
    if cfg.optimizer == "sgd":
        base_opt = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    else:
        base_opt = torch.optim.Adam(model.parameters(), lr=peak_lr, weight_decay=cfg.weight_decay)
    optimizer = dist.DistributedOptimizer(base_opt, model.named_parameters(), compression=cfg.compression,
                                          op="adasum" if cfg.adasum else "average", backward_passes_per_step=k)
    schedule = cfg.schedule
    if schedule == "poly":
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.epochs, power=0.9)
    elif schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    elif schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                               patience=cfg.plateau_patience)
    else:
        scheduler = None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    # ---- 4. data: global batches independent of the number of ranks
    train_ids = [c["case_id"] for c in plan["train_cases"]]
    train_ds = SliceDataset(shards_dir, train_ids)
    sampler = GlobalBatchSampler(train_ds, global_batch_size=micro_global, rank=rank, world_size=world,
                                 seed=cfg.seed, fg_fraction=cfg.fg_fraction)
    natural_steps = sampler.n_batches // k
    steps_per_epoch = cfg.steps_per_epoch or natural_steps
    _checked(log, "bad configuration", lambda: _check_steps(steps_per_epoch, natural_steps, len(train_ds), gb))
    if resume:
        _checked(log, "bad configuration", lambda: _check_resume_fits(plan["state"], steps_per_epoch, gb, out))
    my_val = partition_balanced([(c["case_id"], c["n_slices"]) for c in plan["val_cases"]], rank, world)
    val_ds = SliceDataset(shards_dir, list(my_val)) if my_val else None
    augmenter = SliceAugmenter(cfg.augmentation, seed=cfg.seed) if cfg.augment else None
    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                     persistent_workers=False)

    # ---- 5. resume (rank 0 read last.pt) and broadcast from rank 0
    start_epoch, step, best = 0, 0, {"best_score": -math.inf, "best_epoch": None}
    metrics: dict = {}
    state = plan["state"]
    if resume:
        if dist.is_main():
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        meta = dist.broadcast_object(
            {k_: state[k_] for k_ in ("scheduler", "scaler", "epoch", "step", "rng", "metrics", "world_size")}
            if dist.is_main() else None, name="resume.meta")
        if scheduler is not None and meta["scheduler"] is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and meta["scaler"] is not None:
            scaler.load_state_dict(meta["scaler"])
        start_epoch, step, metrics = int(meta["epoch"]), int(meta["step"]), dict(meta["metrics"] or {})
        best = {"best_score": metrics.get("best_score", -math.inf) if metrics.get("best_score") is not None
                else -math.inf, "best_epoch": metrics.get("best_epoch")}
        if rank < len(meta["rng"]):
            ckpt.restore_rng(meta["rng"][rank])
        if meta["world_size"] != world and dist.is_main():
            log.warning("resuming a %d-rank run on %d ranks: the batch sequence is the same (global batch %d), "
                        "rank-local RNG streams (dropout) are not", meta["world_size"], world, gb)
        log.info("resumed from %s: epoch %d, step %d", out / "checkpoints" / "last.pt", start_epoch, step)
        # optimizer state first: Horovod initialises an empty state (ranks != 0) with a zero-gradient step,
        # which weight decay turns into a change of those ranks' weights; the model broadcast then undoes it
        dist.broadcast_optimizer_state(optimizer)
    dist.broadcast_model(model)

    # ---- 6. outputs (rank 0)
    ckpt_dir = out / "checkpoints"
    mlog = None
    tb = None
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _write_config_toml(out / "config.toml", cfg)
        mlog = MetricsLog(out / "metrics.jsonl", keep_until_epoch=start_epoch if resume else -1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(out / "tb"))
        log.info("model %s: %s parameters; optimizer %s lr %.3g (= %.3g x %.3g), schedule %s, warm-up %.3g "
                 "epochs; %d training slices (%d cases), %d validation cases; %d steps/epoch",
                 model_kwargs["name"], f"{count_parameters(model):,}", cfg.optimizer, peak_lr, cfg.base_lr,
                 lr_scale, schedule, cfg.warmup_epochs, len(train_ds), len(train_ids), len(plan["val_cases"]),
                 steps_per_epoch)

    def save_checkpoint(epoch_done: int, tag_epoch: bool) -> None:
        rng_all = dist.allgather_object(ckpt.capture_rng(), name=f"ckpt.rng.{step}")
        if not dist.is_main():
            return
        full = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch_done, "step": step, "rng": rng_all, "config": clean(to_dict(cfg)),
                "model_config": model_kwargs, "preprocessing": manifest["preprocessing"],
                "clinical": _clinical_info(plan["shardset"]),
                "classes": list(manifest["preprocessing"]["classes"]), "manifest_sha256": plan["manifest_sha"],
                "metrics": clean({**{k_: v for k_, v in metrics.items() if k_ != "per_case"}, **best}),
                "hpc_dfs_version": __version__, "world_size": world}
        ckpt.save(full, ckpt_dir / "last.pt")
        if tag_epoch:
            ckpt.copy_atomic(ckpt_dir / "last.pt", ckpt.epoch_path(ckpt_dir, epoch_done))
            ckpt.prune_epoch_checkpoints(ckpt_dir, cfg.keep_last)

    # ---- 7. the loop
    preempt = Preemption().install()
    use_bar = dist.is_main() and sys.stderr.isatty()
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    autocast = (lambda: torch.autocast(device_type="cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    stop_reason = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # ---- 7a. train one epoch
            model.train()
            # this rank's contiguous share of each global batch of the epoch (a function of seed and epoch only)
            lo = rank * local_batch
            batches = [b[lo:lo + local_batch].tolist() for b in sampler.global_batches(epoch)[: steps_per_epoch * k]]
            done_in_epoch = step - epoch * steps_per_epoch   # > 0 only when resuming a preempted epoch
            loader = torch.utils.data.DataLoader(train_ds, batch_sampler=batches[done_in_epoch * k:], **loader_kw)
            batch_iter = iter(loader)
            sync_timer, ar_timer.total = _Timer(), 0.0
            loss_sum, n_steps, t_epoch = 0.0, 0, time.perf_counter()
            bar = None
            if use_bar:
                from tqdm import tqdm
                bar = tqdm(total=steps_per_epoch, initial=done_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           dynamic_ncols=True, leave=False)
            for step_in_epoch in range(done_in_epoch, steps_per_epoch):
                lr_factor = _warmup_factor(step, warmup_steps, lr_scale)
                sched_lrs = [g["lr"] for g in optimizer.param_groups]
                for g, lr in zip(optimizer.param_groups, sched_lrs):
                    g["lr"] = lr * lr_factor
                step_loss = 0.0
                for micro in range(k):
                    batch = next(batch_iter)
                    image = batch["image"].to(device, non_blocking=True)
                    label = batch["label"].to(device, non_blocking=True)
                    clinical = batch["clinical"].to(device, non_blocking=True)
                    risk = batch["risk"].to(device, non_blocking=True)
                    if augmenter is not None:
                        first = (step_in_epoch * k + micro) * micro_global + rank * local_batch
                        image, label = augmenter(image, label, range(first, first + image.shape[0]), epoch)
                    with autocast():
                        outputs = _forward(model, uses_clinical, image, clinical)
                    loss, _ = loss_fn(outputs, label, risk)
                    step_loss += float(loss.detach()) / k
                    loss = loss / k
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                if cfg.adasum:
                    # Adasum reduces the local *updates* inside step() and has no skip_synchronize()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    with sync_timer:
                        optimizer.step()
                else:
                    with sync_timer:          # wait for the ring-allreduce of the gradients
                        optimizer.synchronize()
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if cfg.grad_clip > 0:      # on the averaged gradients: the same on every rank
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    with optimizer.skip_synchronize():
                        if scaler is not None:
                            scaler.step(optimizer)
                            scaler.update()
                        else:
                            optimizer.step()
                optimizer.zero_grad()
                for g, lr in zip(optimizer.param_groups, sched_lrs):
                    g["lr"] = lr
                step += 1
                n_steps += 1
                loss_sum += step_loss
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}")
                elif dist.is_main() and step % cfg.log_every == 0:
                    log.info("epoch %d step %d/%d (global %d): loss %.4f, lr %.3g", epoch + 1, step_in_epoch + 1,
                             steps_per_epoch, step, step_loss, sched_lrs[0] * lr_factor)
                if preempt.agreed(lambda v: dist.allreduce_scalar(v, op="max")):
                    stop_reason = "preempted"
                    break
                if cfg.max_steps and step >= cfg.max_steps:
                    stop_reason = "max_steps"
                    break
            if bar is not None:
                bar.close()
            train_time = time.perf_counter() - t_epoch
            if stop_reason == "preempted":
                break
            completed = step == (epoch + 1) * steps_per_epoch   # False when max_steps cut the epoch short
            epoch_done = epoch + 1 if completed else epoch

            # ---- 7b. throughput and allreduce share (gathered so rank 0 sees every rank)
            samples = n_steps * gb
            per_rank = dist.allgather_object({"t": train_time, "sync": sync_timer.total, "ar": ar_timer.total},
                                             name=f"epoch.timing.{epoch}")
            t_max = max(p["t"] for p in per_rank)
            comm = [(p["sync"] + p["ar"]) / max(p["t"], 1e-9) for p in per_rank]
            rank_rates = [n_steps * gb / world / max(p["t"], 1e-9) for p in per_rank]
            train_loss = dist.allreduce_scalar(loss_sum / max(n_steps, 1), op="mean", name=f"epoch.loss.{epoch}")

            # ---- 7c. validate: each case on exactly one rank, gathered, summarised identically everywhere
            last_epoch = epoch + 1 == cfg.epochs or stop_reason == "max_steps"
            if epoch_done % cfg.val_every == 0 or last_epoch:
                metrics = validate(model, uses_clinical, val_ds, val_loss_fn, cfg, device, autocast, epoch)
            row = {"epoch": epoch_done, "partial_epoch": not completed, "step": step, "train_loss": train_loss,
                   "val_loss": metrics.get("val_loss"), "kidney_dice": metrics.get("kidney_dice"),
                   "tumor_dice": metrics.get("tumor_dice"), "risk_auc": metrics.get("risk_auc"),
                   "risk_acc": metrics.get("risk_acc"), "samples_per_s": samples / max(t_max, 1e-9),
                   "samples_per_s_per_rank": rank_rates, "allreduce_frac": float(np.mean(comm)),
                   "allreduce_s_per_step": float(np.mean([p["sync"] + p["ar"] for p in per_rank])) / max(n_steps, 1),
                   "step_s": t_max / max(n_steps, 1), "lr": optimizer.param_groups[0]["lr"] * _warmup_factor(
                       step, warmup_steps, lr_scale), "world_size": world, "time": time.time()}

            # ---- 7d. schedule, best, checkpoint (rank 0 writes), log
            if scheduler is not None and completed:   # per-epoch schedules step on whole epochs only
                if schedule == "plateau":
                    if metrics.get("val_loss") is not None:
                        scheduler.step(metrics["val_loss"])
                else:
                    scheduler.step()
            s = score(metrics) if metrics else -math.inf
            is_best = s > best["best_score"]
            if is_best:
                best = {"best_score": s, "best_epoch": epoch_done}
            save_checkpoint(epoch_done, tag_epoch=completed)
            if dist.is_main():
                if is_best:
                    ckpt.copy_atomic(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
                mlog.append(row)
                if tb is not None:
                    for key in ("train_loss", "val_loss", "kidney_dice", "tumor_dice", "risk_auc", "risk_acc",
                                "samples_per_s", "allreduce_frac", "lr"):
                        if row.get(key) is not None and math.isfinite(row[key]):
                            tb.add_scalar(key, row[key], epoch_done)
                log.info("epoch %d/%d step %s | train loss %s | val loss %s, kidney Dice %s, tumour Dice %s, "
                         "risk AUC %s acc %s | %.1f samples/s (%.1f per rank, slowest %.1f) | allreduce %.1f%% of "
                         "step time | lr %.3g | %.1f s%s", epoch + 1, cfg.epochs,
                         f"{step}" if completed else f"{step} (stopped by max_steps mid-epoch)", _fmt(train_loss, ".4f"),
                         _fmt(row["val_loss"], ".4f"), _fmt(row["kidney_dice"]), _fmt(row["tumor_dice"]),
                         _fmt(row["risk_auc"]), _fmt(row["risk_acc"]), row["samples_per_s"],
                         row["samples_per_s"] / world, min(rank_rates), 100 * row["allreduce_frac"], row["lr"],
                         train_time, " (best)" if is_best else "")
            if stop_reason == "max_steps":
                break
        if stop_reason == "preempted":
            epoch_done = step // steps_per_epoch
            save_checkpoint(epoch_done, tag_epoch=False)
            if dist.is_main():
                log.warning("got %s: stopped after step %d (epoch %d + %d steps), wrote %s; exiting with %d so the "
                            "job is requeued; continue with --resume", preempt.name or "a signal on another rank",
                            step, epoch_done, step - epoch_done * steps_per_epoch, ckpt_dir / "last.pt",
                            EXIT_PREEMPTED)
    finally:
        preempt.uninstall()
        if tb is not None:
            tb.close()
    if dist.is_main() and mlog is not None:
        from hpc_dfs.training.plots import plot_curves
        plot_curves(mlog.rows, out / "curves.png", title=f"{model_kwargs['name']} on {shards_dir.name}, "
                                                          f"{world} rank(s)")
        log.info("done: %s, %s, %s", ckpt_dir / "last.pt", out / "metrics.jsonl", out / "curves.png")
    dist.barrier()
    return EXIT_PREEMPTED if stop_reason == "preempted" else 0


def _check_steps(steps: int, natural: int, n_slices: int, gb: int) -> None:
    if natural < 1:
        raise ConfigError(f"the training set has {n_slices} slices, fewer than one global batch of {gb}")
    if steps > natural:
        raise ConfigError(f"steps_per_epoch {steps} exceeds the {natural} global batches of one pass over the "
                          f"{n_slices} training slices")


def _check_resume_fits(state: dict | None, steps_per_epoch: int, gb: int, out: Path) -> None:
    """On rank 0 (which read last.pt): the checkpoint's step must fall inside its epoch at this run's settings."""
    if state is None:
        return
    epoch, step = int(state["epoch"]), int(state["step"])
    if not 0 <= step - epoch * steps_per_epoch <= steps_per_epoch:
        raise ckpt.CheckpointError(
            f"{out / 'checkpoints' / 'last.pt'} is at epoch {epoch}, step {step}, which does not fit {steps_per_epoch} "
            f"steps per epoch (global batch {gb}): resume with the run's batch and steps_per_epoch settings")


def _seed(seed: int, rank: int) -> int:
    return derive_seed(seed, 1_000_003, rank)


def _clinical_info(shardset) -> dict:
    """The checkpoint's ``clinical`` entry: the fitted clinical pipeline (plain JSON) and feature names."""
    info = shardset.manifest.get("clinical") or {}
    return clean({"pipeline": shardset.clinical_pipeline(), "feature_names": list(info.get("feature_names") or []),
                  "n_features": int(info.get("n_features") or 0)})


def _write_config_toml(path: Path, cfg: TrainConfig) -> None:
    import tomli_w

    def drop_none(d):
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
    write_text(path, tomli_w.dumps(drop_none(to_dict(cfg))))


# ============================================================================ validation
@torch.no_grad()
def validate(model, uses_clinical: bool, val_ds, loss_fn, cfg: TrainConfig, device, autocast, epoch: int) -> dict:
    """Validation metrics over all ranks' cases; every rank returns the same dict.

    Per case: the Dice statistics over its slices and the loss of the DFS loss's statistics summed over
    the case (so the loss does not depend on how slices are batched or ranks split); see
    :mod:`hpc_dfs.training.metrics`.
    """
    model.eval()
    acc = CaseAccumulator()
    case_stats: dict[str, torch.Tensor] = {}
    if val_ds is not None:
        loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.val_batch_size, shuffle=False,
                                             num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
        for batch in loader:
            image = batch["image"].to(device)
            label = batch["label"].to(device)
            clinical = batch["clinical"].to(device)
            risk = batch["risk"].to(device)
            with autocast():
                out = _forward(model, uses_clinical, image, clinical)
            logits = out["seg_logits"].float()
            risk_logit = out.get("risk_logit")
            acc.update(logits, label, risk_logit, risk, batch["case_id"])
            for i, cid in enumerate(batch["case_id"]):
                o = {"seg_logits": logits[i:i + 1]}
                if risk_logit is not None:
                    o["risk_logit"] = risk_logit[i:i + 1].float()
                st = loss_fn.statistics(o, label[i:i + 1], risk[i:i + 1]).double().cpu()
                case_stats[cid] = case_stats[cid] + st if cid in case_stats else st
    records = acc.records()
    for r in records:
        r["loss"] = float(loss_fn.from_statistics(case_stats[r["case_id"]].float())[0])
    gathered = [r for part in dist.allgather_object(records, name=f"val.records.{epoch}") for r in part]
    model.train()
    metrics = summarise(gathered)
    metrics["val_loss"] = float(np.mean([r["loss"] for r in gathered])) if gathered else float("nan")
    return metrics
