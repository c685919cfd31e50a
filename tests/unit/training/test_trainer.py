"""The trainer at size 1 (one process, no launcher): ``train_step``, a short ``train()``, rank-free dropout.

The shards are made once with the real ``hpc-dfs synth`` + ``preprocess`` (4 phantom cases, 32x32).
What 2 ranks add (gradient averaging, np=2 == np=1) is proven in tests/distributed/test_train_distributed.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hpc_dfs import parallel
from hpc_dfs.cli import main as cli
from hpc_dfs.config import load
from hpc_dfs.config.train import TrainConfig
from hpc_dfs.models.dropout import SampleDropout, per_sample_dropout
from hpc_dfs.contracts import checkpoint as ckpt
from hpc_dfs.training.plan import model_kwargs, prepare
from hpc_dfs.training.state import TrainState
from hpc_dfs.training.trainer import Trainer

SMALL = ["data.num_workers=0", "model.base_channels=4", "data.global_batch_size=4", "data.batch_size=4",
         "deterministic=true", "seed=3", "data.val_batch_size=8", "schedule.epochs=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trainer")
    assert cli(["synth", "--out", str(root / "data"), "--cases", "4", "--seed", "0", "--size", "32",
                "--min-slices", "6", "--max-slices", "8"]) == 0
    assert cli(["preprocess", "--data", str(root / "data"), "--out", str(root / "shards"), "--slice-size", "32,32",
                "--n-folds", "4"]) == 0
    parallel.init()
    assert parallel.size() == 1
    return root / "shards"


def _trainer(shards: Path, out: Path, *overrides: str) -> Trainer:
    cfg = load(TrainConfig, overrides=[*SMALL, *overrides])
    plan = prepare(cfg, shards, out, resume=False)
    plan.model_kwargs = model_kwargs(cfg, plan.manifest)
    return Trainer(cfg, plan, shards, out)


def _first_batch(tr: Trainer) -> dict:
    return next(iter(tr._epoch_loader(0, 0)))


def test_train_step_at_size_1(shards, tmp_path):
    tr = _trainer(shards, tmp_path / "a")
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    batch = _first_batch(tr)
    assert batch["image"].shape[0] == 4                          # the whole global batch on the one rank
    stats = tr.train_step(batch)
    assert tr.state.step == 1 and math.isfinite(stats["loss"]) and stats["loss"] > 0
    assert stats["lr"] == pytest.approx(tr.cfg.optim.base_lr)     # lr_scale 1: no warm-up ramp
    moved = [k for k, v in tr.model.state_dict().items()
             if torch.is_floating_point(v) and not torch.equal(v, before[k])]
    assert moved, "one step changed no weight"
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(tr.cfg.optim.base_lr)   # warm-up factor undone

    # deterministic: the same step from the same start gives the same weights, bit for bit (dropout included)
    again = _trainer(shards, tmp_path / "b")
    again.train_step(_first_batch(again))
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_train_step_accumulates_micro_batches(shards, tmp_path):
    tr = _trainer(shards, tmp_path / "a", "horovod.backward_passes_per_step=2")
    it = iter(tr._epoch_loader(0, 0))
    micro = [next(it), next(it)]
    assert [b["image"].shape[0] for b in micro] == [2, 2]
    stats = tr.train_step(micro)
    assert tr.state.step == 1 and math.isfinite(stats["loss"])


def test_short_run_writes_the_schema_and_resumes_state(shards, tmp_path):
    out = tmp_path / "run"
    tr = _trainer(shards, out, "schedule.max_steps=2")
    assert tr.train() == 0
    state = ckpt.load(out / "checkpoints" / "last.pt")                 # every REQUIRED_KEY, weights_only
    assert state["step"] == 2 and state["epoch"] == 0                  # max_steps cut the first epoch
    assert state["config"]["optim"]["optimizer"] == "adam" and state["config"]["schedule"]["max_steps"] == 2
    st = TrainState.from_checkpoint(state)
    assert (st.epoch, st.step) == (0, 2) and st.best_score == state["metrics"]["best_score"]
    assert (out / "metrics.jsonl").read_text().count("\n") == 1 and (out / "curves.png").is_file()
    assert len(tr.state.history) == 1 and tr.state.history[0]["partial_epoch"] is True


def test_sample_dropout_masks_follow_the_seeds_not_the_batch():
    torch.manual_seed(0)
    drop = SampleDropout(0.5).train()
    x = torch.ones(4, 64)
    seeds = [11, 12, 13, 14]
    with per_sample_dropout(drop, seeds) as n:
        whole = drop(x)
    assert n == 1 and drop.sample_seeds is None
    with per_sample_dropout(drop, seeds[:2]):
        first = drop(x[:2])
    torch.rand(100)                                                    # other draws between: no effect
    with per_sample_dropout(drop, seeds[2:]):
        second = drop(x[2:])
    assert torch.equal(whole, torch.cat([first, second]))             # 1 rank == 2 ranks of 2
    assert not torch.equal(whole[0], whole[1])                         # distinct seeds, distinct masks
    assert set(whole.unique().tolist()) <= {0.0, 2.0}                  # inverted dropout scaling
    # without seeds (and in eval mode) it is nn.Dropout: same RNG use, same result
    torch.manual_seed(5)
    ours = drop(x)
    torch.manual_seed(5)
    assert torch.equal(ours, torch.nn.Dropout(0.5).train()(x))
    assert torch.equal(drop.eval()(x), x)
