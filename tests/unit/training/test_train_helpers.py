"""Training helpers: config semantics, checkpoints (weights_only), RNG capture, metrics, curves, signals."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from hpc_dfs.config import ConfigError, add_arguments, from_args, load
from hpc_dfs.config.train import TrainConfig
from hpc_dfs.errors import EXIT_PREEMPTED
from hpc_dfs.contracts import checkpoint as ckpt
from hpc_dfs.training.optim import warmup_factor as _warmup_factor
from hpc_dfs.training.metrics import CaseAccumulator, MetricsLog, score, summarise
from hpc_dfs.training.plots import plot_curves
from hpc_dfs.training.signals import Preemption

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- config
def _cfg(*overrides: str) -> TrainConfig:
    return load(TrainConfig, overrides=overrides)


def test_global_batch_and_lr_scaling():
    weak = _cfg("data.batch_size=16")
    assert weak.resolve_global_batch(4) == 64 and weak.lr_scale(4) == 4.0      # Horovod's lr x size
    fixed = _cfg("data.batch_size=16", "data.global_batch_size=64")
    assert fixed.lr_scale(2) == fixed.lr_scale(4) == 4.0                         # independent of ranks
    assert _cfg("data.global_batch_size=64", "optim.lr_scaling='sqrt'").lr_scale(8) == 2.0
    assert _cfg("horovod.adasum=true").lr_scale(8) == 1.0
    accum = _cfg("data.batch_size=8", "horovod.backward_passes_per_step=2")
    assert accum.resolve_global_batch(2) == 32 and accum.lr_scale(2) == 4.0
    with pytest.raises(ConfigError, match="cannot be split evenly over 3 ranks"):
        _cfg("data.global_batch_size=16").resolve_global_batch(3)
    with pytest.raises(ConfigError, match="2 backward passes"):
        _cfg("data.global_batch_size=6", "horovod.backward_passes_per_step=2").resolve_global_batch(2)


def test_optimizer_defaults_follow_the_paper():
    sgd = _cfg("optim.optimizer='sgd'").optim
    assert sgd.base_lr == 0.01 and sgd.lr_schedule == "poly"
    assert TrainConfig().optim.optimizer == "adam"
    adam = _cfg("optim.optimizer='adam'").optim
    assert adam.base_lr == 1e-3 and adam.lr_schedule == "plateau" and adam.plateau_factor == 0.1
    assert adam.plateau_patience == 10


def test_warmup_ramps_from_unscaled_to_scaled_lr():
    assert _warmup_factor(0, 100, 4.0) == 0.25
    assert _warmup_factor(50, 100, 4.0) == pytest.approx(0.625)
    assert _warmup_factor(100, 100, 4.0) == 1.0
    assert _warmup_factor(0, 100, 1.0) == 1.0 and _warmup_factor(0, 0, 4.0) == 1.0


@pytest.mark.parametrize("override, message", [
    ("schedule.epochs=0", "epochs must be >= 1"), ("data.fg_fraction=1.5", "fg_fraction"),
    ("optim.momentum=1.0", "momentum"), ("optim.optimizer='lbfgs'", "optimizer"),
    ("model.base_channels=0", "model.base_channels"), ("augmentation.flip_lr=2", "augmentation.flip_lr"),
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("lr=0.01", r"config key 'lr' is now 'optim.lr'"), ("epochs=3", r"'epochs' is now 'schedule.epochs'")])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load(TrainConfig, overrides=[override])


def test_old_flat_toml_names_the_new_key(tmp_path):
    toml = tmp_path / "old.toml"
    toml.write_text("lr = 0.01\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"config key 'epochs' is now 'schedule.epochs'.*\[schedule\] table"):
        load(TrainConfig, toml)
    toml.write_text("[optim]\nlr = 0.01\n[schedule]\nepochs = 3\n")
    cfg = load(TrainConfig, toml, ["optim.lr=1e-3"])
    assert (cfg.optim.lr, cfg.schedule.epochs) == (1e-3, 3)


def test_cli_flags_and_nested_overrides():
    p = argparse.ArgumentParser()
    add_arguments(p, TrainConfig)
    args = p.parse_args(["--epochs", "3", "--global-batch-size", "8", "--no-sync-bn", "--optimizer", "adam",
                         "--set", "model.base_channels=8", "--set", "augmentation.noise_prob=0.5"])
    cfg = from_args(TrainConfig, args)
    assert (cfg.schedule.epochs, cfg.data.global_batch_size, cfg.horovod.sync_bn, cfg.optim.optimizer) == \
        (3, 8, False, "adam")
    assert cfg.model.base_channels == 8 and cfg.augmentation.noise_prob == 0.5
    assert EXIT_PREEMPTED == 75
    # a flag beats --set of the same setting (file < --set < flags)
    args = p.parse_args(["--set", "optim.lr=0.5", "--lr", "0.25", "--set", "optim.momentum=0.5"])
    cfg = from_args(TrainConfig, args)
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.25, 0.5)


def test_help_lists_every_setting_of_the_flagged_sections():
    p = argparse.ArgumentParser()
    add_arguments(p, TrainConfig)
    text = p.format_help()
    import dataclasses
    for section in ("schedule", "data", "optim", "loss", "horovod", "checkpoint"):
        assert f"[{section}]" in text
        for f in dataclasses.fields(getattr(TrainConfig(), section)):
            assert "--" + f.name.replace("_", "-") in text, f"{section}.{f.name} has no flag"


# ----------------------------------------------------------------------------- checkpoints
def _state(model, opt, sched):
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": None, "epoch": 1, "step": 5, "rng": [ckpt.capture_rng(), ckpt.capture_rng()],
            "config": {"epochs": 2, "lr": None}, "model_config": {"name": "unet"}, "preprocessing": {"a": [1, 2]},
            "clinical": {"pipeline": None, "feature_names": [], "n_features": 0}, "classes": ["bg", "k", "t"],
            "manifest_sha256": "ab" * 32, "metrics": {"kidney_dice": 0.5, "risk_auc": None, "best_score": -math.inf},
            "hpc_dfs_version": "0.1.0", "world_size": 2}


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 5, 5)).sum().backward()
    opt.step()
    for sched in (torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=5, power=0.9),
                  torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=10)):
        path = tmp_path / "checkpoints" / "last.pt"
        ckpt.save(_state(model, opt, sched), path)
        back = torch.load(path, weights_only=True)          # what predict and --resume do
        assert set(ckpt.REQUIRED_KEYS) <= set(back)
        assert torch.equal(back["model"]["0.weight"], model.state_dict()["0.weight"])
        assert back["optimizer"]["state"][0]["momentum_buffer"].shape == model[0].weight.shape
        assert ckpt.load(path)["step"] == 5
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="bad.pt"):
        ckpt.load(bad)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ckpt.CheckpointError, match="lacks keys"):
        ckpt.load(tmp_path / "foreign.pt")
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.save({"model": {}}, tmp_path / "x.pt")


def test_rng_capture_restore_replays_every_stream():
    state = ckpt.capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_prune_keeps_last_k(tmp_path):
    for e in (1, 2, 3, 10, 11):
        ckpt.epoch_path(tmp_path, e).write_bytes(b"x")
    ckpt.prune_epoch_checkpoints(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0003.pt", "epoch_0010.pt", "epoch_0011.pt"]


# ----------------------------------------------------------------------------- metrics
def _logits(pred: torch.Tensor, n_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, n_classes).permute(0, 3, 1, 2).float() * 10


def test_case_dice_counts_each_case_once_over_its_slices():
    acc = CaseAccumulator()
    label = torch.zeros(3, 4, 4, dtype=torch.long)
    label[:, :2, :2] = 1
    label[0, 0, 0] = 2
    pred = label.clone()
    pred[1, 3, 3] = 1          # one false-positive kidney pixel in case b
    risk = torch.tensor([1.0, 0.0, 0.0])
    acc.update(_logits(pred), label, torch.tensor([3.0, -3.0, -1.0]), risk, ["a", "b", "b"])
    m = summarise(acc.records())
    # a: perfect; b: kidney 8 gt px, 9 predicted, 8 overlap -> 16/17; tumour absent in b -> excluded
    assert m["kidney_dice"] == pytest.approx((1.0 + 16 / 17) / 2)
    assert m["tumor_dice"] == pytest.approx(1.0)
    assert m["risk_auc"] == 1.0 and m["risk_acc"] == 1.0 and m["n_val_cases"] == 2
    assert score(m) == pytest.approx((m["kidney_dice"] + 1.0) / 2)
    with pytest.raises(RuntimeError, match="more than once"):
        summarise(acc.records() + acc.records()[:1])


def test_missed_tumour_counts_zero_and_unknown_risk_is_ignored():
    acc = CaseAccumulator()
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[0, 1, 1] = 2
    acc.update(_logits(torch.zeros_like(label)), label, torch.tensor([0.0]), torch.tensor([-1.0]), ["c"])
    m = summarise(acc.records())
    assert m["tumor_dice"] == 0.0 and m["kidney_dice"] == 0.0
    assert math.isnan(m["risk_auc"]) and math.isnan(m["risk_acc"])


def test_metrics_log_is_strict_json_and_truncates_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for e in (1, 2, 3):
        log.append({"epoch": e, "train_loss": 1.0 / e, "risk_auc": float("nan"), "x": np.float32(0.5)})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[0]["risk_auc"] is None and rows[0]["x"] == 0.5
    resumed = MetricsLog(tmp_path / "metrics.jsonl", keep_until_epoch=2)
    resumed.append({"epoch": 3, "train_loss": 0.1})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["train_loss"] == 0.1


def test_curves_png(tmp_path):
    rows = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "kidney_dice": 0.1 * e, "tumor_dice": None,
             "risk_auc": 0.5, "risk_acc": None} for e in (1, 2, 3)]
    path = plot_curves(rows, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves([], tmp_path / "empty.png") is None


# ----------------------------------------------------------------------------- signals
def test_preemption_flag_and_agreement():
    p = Preemption().install()
    try:
        assert not p.agreed(lambda v: v)
        assert p.agreed(lambda v: max(v, 1.0))          # another rank got it
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.received == signal.SIGUSR1 and p.name == "SIGUSR1" and p.agreed(lambda v: v)
    finally:
        p.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is not p._handle


def test_stored_config_of_either_layout_reads_back():
    """A checkpoint's ``config``: sections now, flat before them; ``from_stored`` reads both (report uses it)."""
    from hpc_dfs.config import to_dict
    cfg = _cfg("optim.lr=0.02", "schedule.epochs=7", "data.batch_size=8", "horovod.sync_bn=false", "seed=5",
               "model.base_channels=8")
    nested = to_dict(cfg)
    flat = {k: v for k, v in nested.items() if k not in ("schedule", "data", "optim", "loss", "horovod", "checkpoint")}
    for section in ("schedule", "data", "optim", "loss", "horovod", "checkpoint"):
        flat.update(nested[section])
    assert "lr" in flat and "optim" not in flat                      # the pre-sections layout
    assert TrainConfig.from_stored(nested) == cfg == TrainConfig.from_stored(flat)
    with pytest.raises(ConfigError, match=r"is now '(optim|horovod|data|schedule)\.[a-z_]+'.*more key"):
        from hpc_dfs.config import from_dict
        from_dict(TrainConfig, flat)                                 # user input is refused, not migrated
