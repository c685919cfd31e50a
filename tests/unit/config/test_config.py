"""hpc_dfs.config: TOML + overrides + generated CLI flags, with one clear error per bad key."""
import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from hpc_dfs.config import ConfigError, add_arguments, from_args, load, parse_override, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    name: Literal["adam", "sgd"] = "adam"


@dataclass
class Stage:
    epochs: int = 10
    size: list[int] = field(default_factory=lambda: [64, 64])
    tag: Optional[str] = None
    deterministic: bool = False
    optim: Optim = field(default_factory=Optim)

    def validate(self):
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")


def test_defaults_toml_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('epochs = 3\nsize = [32, 48]\n[optim]\nname = "sgd"\n')
    cfg = load(Stage, toml, ["optim.lr=0.5", "tag=run1"])
    assert (cfg.epochs, cfg.size, cfg.optim.name, cfg.optim.lr, cfg.tag) == (3, [32, 48], "sgd", 0.5, "run1")
    assert to_dict(cfg)["optim"] == {"lr": 0.5, "name": "sgd"}


@pytest.mark.parametrize("override, message", [
    ("epoch=3", "unknown config key 'epoch'"),
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("optim.name=rmsprop", "must be one of"),
    ("epochs=2.5", "must be an integer"),
    ("epochs=0", "epochs must be >= 1"),
    ("deterministic=maybe", "true/false"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load(Stage, None, [override])


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Stage, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(Stage, bad)


def test_cli_flags_override_file_and_set(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("epochs = 3\n")
    p = argparse.ArgumentParser()
    add_arguments(p, Stage)
    args = p.parse_args(["--config", str(toml), "--set", "epochs=4", "--epochs", "5", "--deterministic",
                         "--size", "16,24"])
    cfg = from_args(Stage, args)
    assert (cfg.epochs, cfg.deterministic, cfg.size) == (5, True, [16, 24])


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("x=[1,2]") == (["x"], [1, 2])
    assert parse_override("s=hello") == (["s"], "hello")
    with pytest.raises(ConfigError):
        parse_override("novalue")


@dataclass
class Sched:
    warmup: float = 0.0
    name: str = "poly"


@dataclass
class Sectioned:
    optim: Optim = field(default_factory=Optim, metadata={"help": "optimizer", "flags": True})
    sched: Sched = field(default_factory=Sched, metadata={"help": "schedule", "flags": True})
    hidden: Optim = field(default_factory=Optim)          # no "flags": settable with --set only
    seed: int = 0


def test_flagged_sections_get_flags_by_field_name():
    p = argparse.ArgumentParser()
    add_arguments(p, Sectioned, skip=("name",))
    args = p.parse_args(["--lr", "0.5", "--warmup", "2", "--seed", "7", "--set", "hidden.lr=0.25"])
    cfg = from_args(Sectioned, args)
    assert (cfg.optim.lr, cfg.sched.warmup, cfg.seed, cfg.hidden.lr) == (0.5, 2.0, 7, 0.25)
    assert "[optim] optimizer" in p.format_help() and "--name" not in p.format_help()


def test_a_key_at_the_wrong_level_names_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'warmup' is now 'sched.warmup'"):
        load(Sectioned, overrides=["warmup=1"])
    toml = tmp_path / "flat.toml"
    toml.write_text("warmup = 1.0\n")
    with pytest.raises(ConfigError, match=r"\[sched\] table"):
        load(Sectioned, toml)
    # 'lr' is in two sections (optim, hidden): no guess, the plain unknown-key message
    with pytest.raises(ConfigError, match=r"unknown config key 'lr' \(known:"):
        load(Sectioned, overrides=["lr=1"])
