"""Non-finite numbers stop training and are refused in checkpoints; --resume keeps its settings."""
from __future__ import annotations

import pytest

from hpc_dfs.config import load
from hpc_dfs.config.train import TrainConfig


def test_a_non_finite_loss_or_gradient_stops_training():
    import torch

    from hpc_dfs.training.guards import NonFiniteError, check_loss, check_metrics, clip_and_check
    with pytest.raises(NonFiniteError, match="step 3"):
        check_loss(float("nan"), 3, 0)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(NonFiniteError, match="gradient norm is inf"):
        clip_and_check([p], 0.0, 1)
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    clip_and_check([p], 0.0, 1)          # no clipping: the gradient is kept exactly
    assert p.grad.tolist() == [3.0, 4.0, 0.0]
    with pytest.raises(NonFiniteError, match="validation loss"):
        check_metrics({"val_loss": float("nan"), "n_val_cases": 1}, 0)
    assert check_metrics({"val_loss": float("nan"), "n_val_cases": 0}, 0)["n_val_cases"] == 0


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    import torch

    from hpc_dfs.contracts import checkpoint as ckpt
    state = {k: None for k in ckpt.REQUIRED_KEYS}
    state.update(model={"w": torch.tensor([1.0, float("nan")])}, model_config={"name": "unet"})
    ckpt.save(state, tmp_path / "last.pt")
    with pytest.raises(ckpt.CheckpointError, match="non-finite weights"):
        ckpt.load(tmp_path / "last.pt", require=ckpt.INFERENCE_KEYS)


def test_resume_refuses_settings_the_optimizer_state_would_override():
    from hpc_dfs.config import to_dict
    from hpc_dfs.training.plan import resume_changes
    stored = to_dict(load(TrainConfig, overrides=["optim.lr=0.002"]))
    assert resume_changes(stored, load(TrainConfig, overrides=["optim.lr=0.002", "schedule.epochs=9"])) == []
    changed = resume_changes(stored, load(TrainConfig, overrides=["optim.lr=0.01", "optim.optimizer='sgd'"]))
    assert [c.split()[0] for c in changed] == ["optim.lr", "optim.optimizer"]
    assert resume_changes(None, load(TrainConfig)) == []
    # the engine may change: Horovod and torch.distributed do the same arithmetic (a checkpoint resumes under either)
    horovod = to_dict(load(TrainConfig, overrides=["optim.lr=0.002", "engine='horovod'"]))
    assert resume_changes(horovod, load(TrainConfig, overrides=["optim.lr=0.002", "engine='torch'"])) == []
