"""nnU-Net v2's own trainer, given a wall-clock budget instead of 1000 epochs: the peer of ``bench quality``.

This file runs inside the nnU-Net peer environment (``bench/.venv-nnunet``), not in hpc-dfs's: ``bench quality``
copies it into ``nnunetv2/training/nnUNetTrainer/`` there, which is where nnU-Net looks for trainers
(its documented way of adding one), so that the real ``nnUNetv2_train -tr nnUNetTrainerBudget`` and
``nnUNetv2_predict -tr nnUNetTrainerBudget`` run it.

What differs from ``nnUNetTrainer``, and nothing else (loss, sampling, augmentation, network, optimizer, poly
schedule's shape and initial learning rate are nnU-Net's):

- **Length.** Training stops, mid-epoch if need be, where its end falls nearest ``HPC_DFS_BUDGET_S`` seconds
  after the first training step's start: before an iteration that would end (with the epoch's validation, as
  long as the last one took) more than half an iteration past it. The data loaders' start-up is not counted,
  as hpc-dfs's train time is counted from its first epoch. An epoch is ``HPC_DFS_NNUNET_ITERS`` training
  iterations (default 25, nnU-Net: 250) and a fifth as many validation iterations (nnU-Net's own ratio,
  50 to 250); the last epoch's validation is run in full.
- **Schedule.** nnU-Net's poly learning rate ``lr0 * (1 - progress) ** 0.9`` with progress measured as the
  fraction of the budget spent, not of 1000 epochs, so that it decays to about 0 at the budget as it would
  at the end of a full run.
- **No final validation.** ``bench quality`` predicts its own held-out cases with ``nnUNetv2_predict``.
- ``budget.json`` in the output folder: the budget, the training seconds, epochs and iterations run.
"""
from __future__ import annotations

import json
import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming
    """nnU-Net's trainer within ``HPC_DFS_BUDGET_S`` seconds of training (see the module docstring)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = float(os.environ.get("HPC_DFS_BUDGET_S", "60"))
        self.num_iterations_per_epoch = int(os.environ.get("HPC_DFS_NNUNET_ITERS", "25"))
        self.num_val_iterations_per_epoch = max(1, self.num_iterations_per_epoch // 5)
        self.num_epochs = 100000          # the budget ends training, not the epoch count
        self._t0: float | None = None

    def _elapsed(self) -> float:
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    def _progress(self) -> float:
        return min(1.0, self._elapsed() / self.budget_s)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self._t0 is None:
            self._t0 = time.perf_counter()
        lr = self.initial_lr * (1.0 - self._progress()) ** 0.9
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.logger.log("lrs", lr, self.current_epoch)

    def run_training(self):
        self.on_train_start()
        epochs = iters = 0
        step_s: list[float] = []
        val_s = 0.0
        done = False
        while not done and self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            for _ in range(self.num_iterations_per_epoch):
                t = time.perf_counter()
                outputs.append(self.train_step(next(self.dataloader_train)))
                step_s.append(time.perf_counter() - t)
                # stop where the end (this epoch's validation included) falls nearest the budget
                recent = sorted(step_s[-9:])[len(step_s[-9:]) // 2]
                if self._elapsed() + 0.5 * recent + val_s >= self.budget_s:
                    done = True
                    break
            iters += len(outputs)
            self.on_train_epoch_end(outputs)
            t = time.perf_counter()
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [self.validation_step(next(self.dataloader_val))
                       for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val)
            val_s = time.perf_counter() - t
            self.on_epoch_end()
            epochs += 1
        train_s = self._elapsed()
        self.on_train_end()
        if self.local_rank == 0:
            tmp = os.path.join(self.output_folder, ".tmp-budget.json")
            with open(tmp, "w") as f:
                json.dump({"budget_s": self.budget_s, "train_s": round(train_s, 1), "epochs": epochs,
                           "iterations": iters, "iterations_per_epoch": self.num_iterations_per_epoch,
                           "median_iteration_s": round(sorted(step_s)[len(step_s) // 2], 3),
                           "batch_size": self.batch_size, "patch_size": list(self.configuration_manager.patch_size),
                           "spacing": list(self.configuration_manager.spacing)}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.output_folder, "budget.json"))

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped: bench quality predicts its own held-out cases")
