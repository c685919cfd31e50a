"""The DFS training loop (:class:`Trainer`): ``train()`` reads top to bottom and delegates to
``train_step(batch)``, ``validate()``, ``end_epoch()`` and ``save_checkpoint(state)``.

A Trainer is built from a checked :class:`~hpc_dfs.training.plan.TrainPlan` on every rank (after
``parallel.init()``; size 1 needs no launcher, so a unit test runs ``train_step`` in one process). What each
step does, and why 2 ranks give the 1-rank gradients, is in :mod:`hpc_dfs.stages.train`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hpc_dfs import __version__, parallel
from hpc_dfs.config import to_dict
from hpc_dfs.config.train import TrainConfig
from hpc_dfs.errors import EXIT_PREEMPTED
from hpc_dfs.data.augment import SliceAugmenter, derive_seed
from hpc_dfs.data.reader import GlobalBatchSampler, SliceDataset, partition_balanced
from hpc_dfs.data.regions import resolve_regions
from hpc_dfs.log import get_logger
from hpc_dfs.models.dropout import per_sample_dropout
from hpc_dfs.contracts import checkpoint as ckpt, run as run_contract
from hpc_dfs.training import guards
from hpc_dfs.training.metrics import CaseAccumulator, MetricsLog, clean, epoch_line, score, summarise
from hpc_dfs.training.optim import build_optimizer, build_scheduler, scaled_lrs, step_scheduler, warmup_factor
from hpc_dfs.training.plan import TrainPlan, check_resume_fits, check_steps, checked
from hpc_dfs.training.signals import Preemption
from hpc_dfs.training.run_info import what_ran
from hpc_dfs.training.state import EpochStats, Timer, TrainState, seed_everything

__all__ = ["Trainer"]

log = get_logger("hpc_dfs.train")

_DROPOUT_SALT = 0xD80F   # separates the dropout seeds from the augmentation's (seed, epoch, index)


class Trainer:
    """One rank's share of a data-parallel training run.

    Args:
        cfg: the run's settings.
        plan: the checked inputs (:func:`hpc_dfs.training.plan.prepare`), with ``model_kwargs`` filled in.
        shards_dir: the SHARDS folder.
        out: the RUN folder.
        resume: continue from ``plan.state`` (read by rank 0).
    """

    def __init__(self, cfg: TrainConfig, plan: TrainPlan, shards_dir: Path, out: Path, resume: bool = False) -> None:
        self.cfg, self.plan, self.shards_dir, self.out, self.resume = cfg, plan, Path(shards_dir), Path(out), resume
        self.rank, self.world = parallel.rank(), parallel.size()
        self.gb, self.k = plan.global_batch, cfg.horovod.backward_passes_per_step
        self.micro_global = self.gb // self.k           # samples per backward pass, all ranks together
        self.local_batch = self.micro_global // self.world
        self.ckpt_dir = ckpt.checkpoint_dir(self.out)
        self._setup_device()
        self._build_model()
        self._build_optimization()
        self._build_data()
        self.state = TrainState()
        if resume:
            self._restore()
        parallel.broadcast_model(self.model)
        self._open_outputs()
        self._running_epoch = self.state.epoch      # train_epoch sets it; train_step alone continues the state
        self.epoch_stats = EpochStats()

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Train to ``schedule.epochs`` (or ``max_steps``); returns 0, or 75 after a preemption checkpoint."""
        cfg, st = self.cfg, self.state
        preempt, stop = Preemption().install(), None
        try:
            for epoch in range(st.epoch, cfg.schedule.epochs):
                stop = self.train_epoch(epoch, preempt)
                if stop == "preempted" and st.step < (epoch + 1) * self.steps_per_epoch:
                    break   # mid-epoch; a signal in the last step still finishes the epoch (validation, scheduler)
                if self._validate_now(epoch, stop):
                    st.metrics = self.validate(epoch)
                self.end_epoch(epoch)
                if stop in ("max_steps", "preempted"):   # (a signal in the last epoch's last step: done)
                    stop = None if st.epoch >= cfg.schedule.epochs and stop == "preempted" else stop
                    break
            if stop == "preempted":
                st.epoch = st.step // self.steps_per_epoch
                self.save_checkpoint(st, tag_epoch=False)
                self._log_preempted(preempt)
        finally:
            preempt.uninstall()
            if self.tb is not None:
                self.tb.close()
        self._finish()
        return EXIT_PREEMPTED if stop == "preempted" else 0

    def train_epoch(self, epoch: int, preempt: Preemption | None = None) -> str | None:
        """The steps of ``epoch`` left to do; returns "preempted", "max_steps" or None (epoch done)."""
        self.model.train()
        self._running_epoch = epoch
        done = self.state.step - epoch * self.steps_per_epoch   # > 0 only when resuming a preempted epoch
        batches = iter(self._epoch_loader(epoch, done))
        self.epoch_stats = stats = EpochStats()
        self.ar_timer.total = 0.0
        bar = self._progress_bar(epoch, done)
        stop = None
        for step_in_epoch in range(done, self.steps_per_epoch):
            out = self.train_step([next(batches) for _ in range(self.k)])
            guards.check_loss(out["loss"], self.state.step, epoch)
            stats.loss_sum, stats.n_steps = stats.loss_sum + out["loss"], stats.n_steps + 1
            self._log_step(bar, epoch, step_in_epoch, out)
            if preempt is not None and preempt.agreed(lambda v: parallel.allreduce_scalar(v, op="max")):
                stop = "preempted"
                break
            if self.cfg.schedule.max_steps and self.state.step >= self.cfg.schedule.max_steps:
                stop = "max_steps"
                break
        if bar is not None:
            bar.close()
        stats.train_time = time.perf_counter() - stats.t0
        return stop

    def train_step(self, batch) -> dict:
        """One optimizer step on this rank's share of a global batch.

        Args:
            batch: a batch of :class:`~hpc_dfs.data.reader.SliceDataset`, or a list of
                ``horovod.backward_passes_per_step`` of them (one per backward pass).

        Returns:
            ``{"loss": the global batch's loss, "lr": the rate used}``.
        """
        micro = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        st = self.state
        in_epoch = st.step - self._running_epoch * self.steps_per_epoch
        factor = warmup_factor(st.step, self.warmup_steps, self.lr_scale)
        with scaled_lrs(self.optimizer, factor) as lrs:
            loss = 0.0
            for i, b in enumerate(micro):
                loss += self._backward(b, in_epoch * self.k + i)
            self._optimizer_step()
            self.optimizer.zero_grad()
        st.step += 1
        return {"loss": loss, "lr": lrs.lrs[0] * factor}

    def end_epoch(self, epoch: int) -> dict:
        """Epoch row (throughput, losses, metrics), LR schedule, best, metrics.jsonl, checkpoint; returns the row.

        The row is written BEFORE the checkpoint: a kill between the two leaves a row beyond ``last.pt``'s epoch,
        which ``--resume`` drops (:class:`MetricsLog`) and writes again; the other order lost the row for good.
        """
        st = self.state
        completed = st.step == (epoch + 1) * self.steps_per_epoch   # False when max_steps cut the epoch short
        st.epoch = epoch + 1 if completed else epoch
        row = self._epoch_row(completed)
        if completed:   # per-epoch schedules step on whole epochs only
            step_scheduler(self.scheduler, st.metrics.get("val_loss"))
        is_best = st.improved(score(st.metrics) if st.metrics else -math.inf)
        if parallel.is_main():
            self._write_row(row)
        self.save_checkpoint(st, tag_epoch=completed)
        st.history.append(row)
        if parallel.is_main():
            if is_best:
                ckpt.copy_atomic(ckpt.last_path(self.out), ckpt.best_path(self.out))
            log.info("%s", epoch_line(row, epoch, self.cfg.schedule.epochs, self.world, completed, is_best,
                                      self.epoch_stats.train_time))
        return row

    @torch.no_grad()
    def validate(self, epoch: int) -> dict:
        """Validation metrics over all ranks' cases; every rank returns the same dict.

        Per case: the Dice statistics over its slices and the loss of the DFS loss's statistics summed over
        the case (so the loss does not depend on how slices are batched or ranks split); see
        :mod:`hpc_dfs.training.metrics`.
        """
        self.model.eval()
        acc = CaseAccumulator(self.classes, self.regions)
        case_stats: dict[str, torch.Tensor] = {}
        for batch in self._val_loader():
            image, label, clinical, risk = self._to_device(batch)
            with self.autocast():
                out = self._forward(image, clinical)
            logits, risk_logit = out["seg_logits"].float(), out.get("risk_logit")
            acc.update(logits, label, risk_logit, risk, batch["case_id"])
            for i, cid in enumerate(batch["case_id"]):
                o = {"seg_logits": logits[i:i + 1]}
                if risk_logit is not None:
                    o["risk_logit"] = risk_logit[i:i + 1].float()
                s = self.val_loss_fn.statistics(o, label[i:i + 1], risk[i:i + 1]).double().cpu()
                case_stats[cid] = case_stats[cid] + s if cid in case_stats else s
        records = acc.records()
        for r in records:
            r["loss"] = float(self.val_loss_fn.from_statistics(case_stats[r["case_id"]].float())[0])
        gathered = [r for part in parallel.allgather_object(records, name=f"val.records.{epoch}") for r in part]
        self.model.train()
        metrics = summarise(gathered)
        metrics["val_loss"] = float(np.mean([r["loss"] for r in gathered])) if gathered else float("nan")
        return guards.check_metrics(metrics, epoch)   # a non-finite validation loss stops the run

    def save_checkpoint(self, state: TrainState, tag_epoch: bool) -> None:
        """Every rank's RNG state to rank 0, which writes ``last.pt`` (and ``epoch_XXXX.pt`` when ``tag_epoch``)."""
        rng_all = parallel.allgather_object(ckpt.capture_rng(), name=f"ckpt.rng.{state.step}")
        if not parallel.is_main():
            return
        m = self.plan.manifest
        full: ckpt.Checkpoint = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": state.epoch, "step": state.step, "rng": rng_all, "config": clean(to_dict(self.cfg)),
            "model_config": self.plan.model_kwargs, "preprocessing": m["preprocessing"],
            "clinical": self._clinical_info(), "classes": list(m["preprocessing"]["classes"]), "regions": self.regions,
            "manifest_sha256": self.plan.manifest_sha, "metrics": state.checkpoint_metrics(),
            "hpc_dfs_version": __version__, "world_size": self.world}
        ckpt.save(full, ckpt.last_path(self.out))
        if tag_epoch:
            ckpt.copy_atomic(ckpt.last_path(self.out), ckpt.epoch_path(self.ckpt_dir, state.epoch))
            ckpt.prune_epoch_checkpoints(self.ckpt_dir, self.cfg.checkpoint.keep_last)

    # ------------------------------------------------------------------ one step
    def _backward(self, batch: dict, micro_index: int) -> float:
        """Forward, loss and backward of one micro-batch; returns its share (1/k) of the step's loss."""
        image, label, clinical, risk = self._to_device(batch)
        first = micro_index * self.micro_global + self.rank * self.local_batch   # global index of sample 0
        if self.augmenter is not None:
            image, label = self.augmenter(image, label, range(first, first + image.shape[0]), self._running_epoch)
        with self.autocast(), per_sample_dropout(self.model, self._dropout_seeds(first, image.shape[0])):
            outputs = self._forward(image, clinical)
        loss, _ = self.loss_fn(outputs, label, risk)
        share = float(loss.detach()) / self.k
        loss = loss / self.k
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return share

    def _dropout_seeds(self, first: int, n: int) -> list[int] | None:
        """Deterministic mode: each sample's dropout mask from (seed, step, global index), as its augmentation."""
        if not self.cfg.deterministic:
            return None          # the rank's own RNG stream
        return [derive_seed(self.cfg.seed, _DROPOUT_SALT, self.state.step, first + j) for j in range(n)]

    def _optimizer_step(self) -> None:
        """Average the gradients over ranks (or Adasum the updates), clip, step."""
        clip, opt = self.cfg.optim.grad_clip, self.optimizer
        if self.cfg.horovod.adasum:
            # Adasum reduces the local *updates* inside step() and has no skip_synchronize()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            with self.epoch_stats.sync:
                opt.step()
            return
        with self.epoch_stats.sync:          # wait for the ring-allreduce of the gradients
            opt.synchronize()
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        # on the averaged gradients (the same on every rank); fp16: the scaler skips a non-finite step by design
        guards.clip_and_check(self.model.parameters(), clip, self.state.step + 1, check=self.scaler is None)
        with opt.skip_synchronize():
            if self.scaler is not None:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()

    def _forward(self, image, clinical) -> dict:
        out = self.model(image, clinical) if self.uses_clinical else self.model(image)
        return out if isinstance(out, dict) else {"seg_logits": out}

    def _to_device(self, batch: dict) -> tuple:
        return tuple(batch[key].to(self.device, non_blocking=True) for key in ("image", "label", "clinical", "risk"))

    # ------------------------------------------------------------------ set-up
    def _setup_device(self) -> None:
        """Threads, device, deterministic algorithms, AMP dtype."""
        cfg = self.cfg
        self.threads = parallel.configure_threads(cfg.threads or None)
        self.device = parallel.device()
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
        amp_dtype = None
        if self.device.type == "cuda" and cfg.amp != "off":
            amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
        elif cfg.amp in ("fp16", "bf16"):
            log.warning("amp=%s asked for, but there is no CUDA device: training in fp32", cfg.amp)
        self.amp_dtype = amp_dtype
        self.autocast = ((lambda: torch.autocast(device_type="cuda", dtype=amp_dtype)) if amp_dtype
                         else contextlib.nullcontext)
        if parallel.is_main():
            log.info("job: %s", parallel.topology())
            log.info("%d rank(s) x %d thread(s) on %s; global batch %d = %d ranks x %d per rank x %d backward "
                     "pass(es)", self.world, self.threads, self.device, self.gb, self.world, self.local_batch, self.k)

    def _build_model(self) -> None:
        """The same initial weights on every rank (broadcast later anyway), the DFS loss and its reduction."""
        from hpc_dfs.models import DFSLoss, build_model
        cfg, kw = self.cfg, self.plan.model_kwargs
        seed_everything(cfg.seed)
        model = build_model(**kw)
        if cfg.horovod.sync_bn:
            model = parallel.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.uses_clinical = bool(getattr(self.model, "takes_clinical", False))
        # rank-distinct dropout streams; the data order and augmentation never use these
        torch.manual_seed(derive_seed(cfg.seed, 1_000_003, self.rank))
        self.ar_timer = Timer()
        reduce_fn = None
        if self.world > 1 and not cfg.horovod.adasum:   # Adasum combines rank-local gradients by design: local loss
            def reduce_fn(t):
                with self.ar_timer:
                    return parallel.allreduce(t, op="sum")
        self.classes = list(self.plan.manifest["preprocessing"]["classes"])
        self.regions = resolve_regions(cfg.loss.regions, self.classes)   # None: softmax over the classes
        loss_kw = dict(n_classes=len(self.classes), dice_weight=cfg.loss.dice_weight, ce_weight=cfg.loss.ce_weight,
                       risk_weight=cfg.loss.risk_weight, regions=self.regions and self.regions["classes"])
        self.loss_fn = DFSLoss(reduce_fn=reduce_fn, **loss_kw)
        self.val_loss_fn = DFSLoss(**loss_kw)   # per case, no reduction: cases are split over ranks

    def _build_optimization(self) -> None:
        self.lr_scale = self.cfg.lr_scale(self.world)
        self.peak_lr = self.cfg.optim.base_lr * self.lr_scale
        self.optimizer = build_optimizer(self.cfg, self.model, self.world)
        self.scheduler = build_scheduler(self.cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    def _build_data(self) -> None:
        """Global batches independent of the number of ranks; this rank's validation cases."""
        cfg, plan = self.cfg, self.plan
        self.train_ids = [c["case_id"] for c in plan.train_cases]
        group = "refine" if cfg.stage == "refine" else "main"  # the cascade stage picks the shards' group
        self.train_ds = SliceDataset(self.shards_dir, self.train_ids, group=group, context=cfg.context)
        if cfg.data.shuffle_clinical:  # the ablation's control: records detached from their images
            self.train_ds.permute_clinical(np.random.default_rng(derive_seed(cfg.seed, 17)))
        self.sampler = GlobalBatchSampler(self.train_ds, global_batch_size=self.micro_global, rank=self.rank,
                                          world_size=self.world, seed=cfg.seed, fg_fraction=cfg.data.fg_fraction)
        natural = self.sampler.n_batches // self.k
        self.steps_per_epoch = cfg.schedule.steps_per_epoch or natural
        checked(log, "bad configuration", lambda: check_steps(self.steps_per_epoch, natural, len(self.train_ds),
                                                              self.gb))
        if self.resume:
            checked(log, "bad configuration",
                    lambda: check_resume_fits(plan.state, self.steps_per_epoch, self.gb, self.out))
        size_key = "n_refine_slices" if group == "refine" else "n_slices"
        mine = partition_balanced([(c["case_id"], c.get(size_key, c["n_slices"])) for c in plan.val_cases],
                                  self.rank, self.world)
        self.val_ds = SliceDataset(self.shards_dir, list(mine), group=group, context=cfg.context) if mine else None
        aug = cfg.augmentation
        if aug.translate is None:  # the window jitter of stage 2; stage 1 sees whole slices
            aug = dataclasses.replace(aug, translate=0.1 if cfg.stage == "refine" else 0.0)
        self.augmenter = SliceAugmenter(aug, seed=cfg.seed) if cfg.data.augment else None
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))

    def _restore(self) -> None:
        """Rank 0 read ``last.pt``: load it there, broadcast the rest, restore each rank's RNG streams."""
        state = self.plan.state
        if parallel.is_main():
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        meta = parallel.broadcast_object(
            {k: state[k] for k in ("scheduler", "scaler", "epoch", "step", "rng", "metrics", "world_size")}
            if parallel.is_main() else None, name="resume.meta")
        if self.scheduler is not None and meta["scheduler"] is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        if self.scaler is not None and meta["scaler"] is not None:
            self.scaler.load_state_dict(meta["scaler"])
        self.state = TrainState.from_checkpoint(meta)
        if self.rank < len(self.state.rng):
            ckpt.restore_rng(self.state.rng[self.rank])
        if meta["world_size"] != self.world and parallel.is_main():
            log.warning("resuming a %d-rank run on %d ranks: the batch sequence is the same (global batch %d), "
                        "rank-local RNG streams (dropout) are not unless --deterministic", meta["world_size"],
                        self.world, self.gb)
        log.info("resumed from %s: epoch %d, step %d", ckpt.last_path(self.out), self.state.epoch, self.state.step)
        # optimizer state first: Horovod initialises an empty state (ranks != 0) with a zero-gradient step,
        # which weight decay turns into a change of those ranks' weights; the model broadcast then undoes it
        parallel.broadcast_optimizer_state(self.optimizer)

    def _open_outputs(self) -> None:
        """Rank 0: checkpoint folder, config.toml, metrics.jsonl (cut back to the checkpoint on resume), TensorBoard."""
        self.mlog = self.tb = None
        if not parallel.is_main():
            return
        cfg = self.cfg
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        run_contract.write_config_toml(self.out, to_dict(cfg))
        run_contract.write_run_info(self.out, what_ran(self.device))
        self.mlog = MetricsLog(run_contract.metrics_path(self.out),
                               keep_until_epoch=self.state.epoch if self.resume else -1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"))
        from hpc_dfs.models import count_parameters
        log.info("model %s: %s parameters; optimizer %s lr %.3g (= %.3g x %.3g), schedule %s, warm-up %.3g "
                 "epochs; %d training slices (%d cases), %d validation cases; %d steps/epoch",
                 self.plan.model_kwargs["name"], f"{count_parameters(self.model):,}", cfg.optim.optimizer, self.peak_lr,
                 cfg.optim.base_lr, self.lr_scale, cfg.optim.lr_schedule, cfg.optim.warmup_epochs, len(self.train_ds),
                 len(self.train_ids), len(self.plan.val_cases), self.steps_per_epoch)

    def _clinical_info(self) -> dict:
        """The checkpoint's ``clinical`` entry: the fitted clinical pipeline (plain JSON) and feature names."""
        shardset = self.plan.shardset
        info = shardset.manifest.get("clinical") or {}
        return clean({"pipeline": shardset.clinical_pipeline(), "feature_names": list(info.get("feature_names") or []),
                      "n_features": int(info.get("n_features") or 0)})

    # ------------------------------------------------------------------ loaders
    def _epoch_loader(self, epoch: int, done: int):
        """This rank's contiguous share of each global batch of the epoch (a function of seed and epoch only)."""
        lo = self.rank * self.local_batch
        batches = [b[lo:lo + self.local_batch].tolist()
                   for b in self.sampler.global_batches(epoch)[: self.steps_per_epoch * self.k]]
        return torch.utils.data.DataLoader(self.train_ds, batch_sampler=batches[done * self.k:],
                                           num_workers=self.cfg.data.num_workers,
                                           pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _val_loader(self):
        if self.val_ds is None:
            return []
        return torch.utils.data.DataLoader(self.val_ds, batch_size=self.cfg.data.val_batch_size, shuffle=False,
                                           num_workers=self.cfg.data.num_workers,
                                           pin_memory=self.device.type == "cuda")

    def _validate_now(self, epoch: int, stop: str | None) -> bool:
        completed = self.state.step == (epoch + 1) * self.steps_per_epoch
        epoch_done = epoch + 1 if completed else epoch
        last_epoch = epoch + 1 == self.cfg.schedule.epochs or stop == "max_steps"
        return epoch_done % self.cfg.schedule.val_every == 0 or last_epoch

    # ------------------------------------------------------------------ rows and log lines
    def _progress_bar(self, epoch: int, done: int):
        if not (parallel.is_main() and sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{self.cfg.schedule.epochs}",
                    dynamic_ncols=True, leave=False)

    def _log_step(self, bar, epoch: int, step_in_epoch: int, out: dict) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}")
        elif parallel.is_main() and self.state.step % self.cfg.log_every == 0:
            log.info("epoch %d step %d/%d (global %d): loss %.4f, lr %.3g", epoch + 1, step_in_epoch + 1,
                     self.steps_per_epoch, self.state.step, out["loss"], out["lr"])

    def _epoch_row(self, completed: bool) -> dict:
        """Throughput and allreduce share (gathered, so rank 0 sees every rank), losses and metrics of the epoch."""
        st, es, world, gb = self.state, self.epoch_stats, self.world, self.gb
        n = max(es.n_steps, 1)
        per_rank = parallel.allgather_object({"t": es.train_time, "sync": es.sync.total, "ar": self.ar_timer.total},
                                         name=f"epoch.timing.{self._running_epoch}")
        t_max = max(p["t"] for p in per_rank)
        comm = [(p["sync"] + p["ar"]) / max(p["t"], 1e-9) for p in per_rank]
        rank_rates = [es.n_steps * gb / world / max(p["t"], 1e-9) for p in per_rank]
        train_loss = parallel.allreduce_scalar(es.loss_sum / n, op="mean", name=f"epoch.loss.{self._running_epoch}")
        m = st.metrics
        return {"epoch": st.epoch, "partial_epoch": not completed, "step": st.step, "train_loss": train_loss,
                "val_loss": m.get("val_loss"), "kidney_dice": m.get("kidney_dice"), "tumor_dice": m.get("tumor_dice"),
                **({"masses_dice": m["masses_dice"]} if "masses_dice" in m else {}),
                "risk_auc": m.get("risk_auc"), "risk_acc": m.get("risk_acc"),
                "samples_per_s": es.n_steps * gb / max(t_max, 1e-9), "samples_per_s_per_rank": rank_rates,
                "allreduce_frac": float(np.mean(comm)),
                "allreduce_s_per_step": float(np.mean([p["sync"] + p["ar"] for p in per_rank])) / n,
                "step_s": t_max / n, "lr": self.optimizer.param_groups[0]["lr"] * warmup_factor(
                    st.step, self.warmup_steps, self.lr_scale), "world_size": world, "time": time.time()}

    def _write_row(self, row: dict) -> None:
        self.mlog.append(row)
        if self.tb is not None:
            for key in ("train_loss", "val_loss", "kidney_dice", "tumor_dice", "masses_dice", "risk_auc", "risk_acc",
                        "samples_per_s", "allreduce_frac", "lr"):
                if row.get(key) is not None and math.isfinite(row[key]):
                    self.tb.add_scalar(key, row[key], row["epoch"])

    def _log_preempted(self, preempt: Preemption) -> None:
        if parallel.is_main():
            st = self.state
            log.warning("got %s: stopped after step %d (epoch %d + %d steps), wrote %s; exiting with %d so the "
                        "job is requeued; continue with --resume", preempt.name or "a signal on another rank",
                        st.step, st.epoch, st.step - st.epoch * self.steps_per_epoch, ckpt.last_path(self.out),
                        EXIT_PREEMPTED)

    def _finish(self) -> None:
        """Rank 0 draws the curves; every rank waits for it."""
        if parallel.is_main() and self.mlog is not None:
            from hpc_dfs.training.plots import plot_curves
            curves = self.out / run_contract.CURVES_NAME
            plot_curves(self.mlog.rows, curves,
                        title=f"{self.plan.model_kwargs['name']} on {self.shards_dir.name}, {self.world} rank(s)")
            log.info("done: %s, %s, %s", ckpt.last_path(self.out), run_contract.metrics_path(self.out), curves)
        parallel.barrier()

