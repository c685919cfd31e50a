"""Every float setting refuses NaN and inf; settings that cannot work are refused."""
from __future__ import annotations

import pytest

from hpc_dfs.config import ConfigError, load
from hpc_dfs.config.data import PreprocessConfig
from hpc_dfs.config.train import TrainConfig


@pytest.mark.parametrize("key, value", [("loss.dice_weight", "nan"), ("optim.lr", "inf"), ("optim.lr", "1e12"),
                                        ("augmentation.rotate_deg", "-inf")])
def test_train_float_settings_refuse_nan_inf_and_absurd_rates(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load(TrainConfig, overrides=[f"{key}={value}"])


@pytest.mark.parametrize("override", ["z_spacing=nan", "in_plane_spacing='inf'", "in_plane_spacing='nan'",
                                      "window=[-200, inf]", "slice_size=[16, 16]", "refine.spacing='inf'"])
def test_preprocess_settings_refuse_what_cannot_work(override):
    with pytest.raises(ConfigError):
        load(PreprocessConfig, overrides=[override])


def test_valid_settings_still_load():
    assert load(PreprocessConfig, overrides=["slice_size=[24, 24]", "in_plane_spacing='0.8'"]).slice_size == [24, 24]
    assert load(TrainConfig, overrides=["optim.lr=10"]).optim.lr == 10
