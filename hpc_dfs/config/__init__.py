"""Typed configuration: one dataclass per stage, loaded from TOML plus CLI overrides.

Every stage (synth, preprocess, train, predict, evaluate, clinical) owns a dataclass in a module of
this package. The machinery here is shared:

- :func:`load` builds a dataclass from an optional TOML file and ``key=value`` overrides
  (``--set optim.lr=0.01``), validating names and types, and failing with one clear message.
- :func:`add_arguments` turns the scalar top-level fields of a dataclass into ``--flag`` options,
  so ``hpc-dfs train --epochs 3`` works without hand-written argparse code. A nested section whose
  field carries ``metadata={"flags": True}`` gets flags too, named after its fields alone
  (``TrainConfig.optim.lr`` is ``--lr``), in an argument group of its own.
- A key at the wrong level (a flat ``lr`` where the dataclass has ``optim.lr``) is refused with a
  message naming the key it moved to.
- :func:`from_args` combines ``--config FILE``, ``--set`` and the generated flags (in that order
  of precedence: file < --set < explicit flags).
- :func:`to_dict` gives plain JSON/TOML-able dicts (for checkpoints and manifests).

This module imports nothing else from hpc_dfs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from hpc_dfs.errors import EXIT_USAGE, HpcDfsError

T = TypeVar("T")

__all__ = ["ConfigError", "finite", "load", "from_dict", "to_dict", "add_arguments", "from_args", "parse_override",
           "require_path", "nest_flat"]


class ConfigError(HpcDfsError, ValueError):
    """A configuration value or file is wrong; the message names the key and the problem."""

    code = EXIT_USAGE


def to_dict(obj: Any) -> Any:
    """Dataclass (possibly nested) -> plain dict of JSON-able values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    origin = typing.get_origin(tp)
    try:
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' must be a table, got {value!r}")
            return from_dict(tp, value, prefix=key + ".")
        if origin in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
            items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' must be a table, got {value!r}")
            return dict(value)
        if origin is typing.Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"config key '{key}' must be true/false, got {value!r}")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
            return finite(float(value), key)
        if tp is str:
            return str(value)
        if tp is Path:
            return Path(value)
        return value
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config key '{key}': cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None


def finite(value: float, key: str) -> float:
    """``value`` when it is a finite number: every float setting is read through here.

    Args:
        value: the number read.
        key: the setting, named in the error.

    Raises:
        ConfigError: NaN or infinite (``--set loss.dice_weight=nan``, ``--lr inf``), naming the key.
    """
    if not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build ``cls`` from a (nested) dict; unknown keys are an error naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        moved = _moved_to(cls, unknown[0])
        if moved:
            more = sum(1 for k in unknown[1:] if _moved_to(cls, k))
            also = f"; {more} more key(s) of the old flat layout too" if more else ""
            raise ConfigError(f"config key '{prefix}{unknown[0]}' is now '{prefix}{moved}' (the settings are grouped "
                              f"in sections: write it in the [{prefix}{moved.rsplit('.', 1)[0]}] table or as "
                              f"--set {prefix}{moved}=...){also}")
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _sections(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """The nested dataclass fields of ``cls`` with their types."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out.append((f, tp))
    return out


def _moved_to(cls: type, key: str) -> str | None:
    """``section.key`` when exactly one nested section of ``cls`` has a field named ``key``."""
    hits = [f"{f.name}.{key}" for f, tp in _sections(cls) if key in {g.name for g in dataclasses.fields(tp)}]
    return hits[0] if len(hits) == 1 else None


def nest_flat(cls: type, data: dict) -> dict:
    """Move top-level keys of an old flat layout into the one nested section of ``cls`` that has them.

    For reading what older versions stored (a checkpoint's ``config``); user input is not migrated but
    refused with the new key's name (:func:`from_dict`). Keys no section has are kept, so
    :func:`from_dict` still names them.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items() if k in names}
    for k, v in data.items():
        moved = None if k in names else _moved_to(cls, k)
        if moved is None:
            out.setdefault(k, v)
            continue
        section, key = moved.split(".", 1)
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section].setdefault(key, v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a","b"], 3). The value is read as a TOML value, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _set_path(d: dict, path: list[str], value: Any) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{p}' is not a table")
    d[path[-1]] = value


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = (),
         extra: dict | None = None) -> T:
    """TOML file (optional) + ``key=value`` overrides + ``extra`` dict -> validated dataclass."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    base = to_dict(cls())  # defaults, so that nested overrides merge into full tables
    merged = _merge(base, data)
    for o in overrides:
        keys, value = parse_override(o)
        _set_path(merged, keys, value)
    for k, v in (extra or {}).items():
        _set_path(merged, k.split("."), v)
    return from_dict(cls, merged)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "") if f.metadata else ""


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: typing.Iterable[str] = ()) -> None:
    """Add ``--config``, ``--set`` and one ``--flag`` per scalar field of ``cls`` and of its flagged sections.

    Args:
        parser: the verb's parser.
        cls: the stage's config dataclass.
        skip: field names (top level or in a flagged section) that get no flag (the verb adds its own).
    """
    skip = set(skip)
    parser.add_argument("--config", type=Path, default=None, help="TOML file with settings for this stage")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting, nested ones too (e.g. --set model.base_channels=16); repeatable")
    group = parser.add_argument_group(f"{cls.__name__} settings (defaults shown; also settable in --config)")
    _add_flags(group, cls, cls(), "", skip)
    for f, tp in _sections(cls):
        if f.metadata.get("flags"):
            sub = parser.add_argument_group(f"[{f.name}] {_field_help(f)} (--set {f.name}.KEY=VALUE or these flags)")
            _add_flags(sub, tp, getattr(cls(), f.name), f.name + ".", skip)


def _add_flags(group, cls: type, defaults: Any, prefix: str, skip: set) -> None:
    """One ``--field-name`` per scalar field of ``cls``; the value lands in ``cfg__PREFIXfield``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        if f.name in skip or dataclasses.is_dataclass(tp):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        help_text = f"{_field_help(f)} (default: {shown})".strip()
        dest = f"cfg__{prefix}{f.name}"
        if tp is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kwargs: dict = {"dest": dest, "default": None, "help": help_text, "metavar": f.name.upper()}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            del kwargs["metavar"]
        elif tp in (int, float):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        group.add_argument(flag, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from parsed args made by :func:`add_arguments`."""
    extra = {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}
    return load(cls, getattr(args, "config", None), getattr(args, "overrides", []) or [], extra)


def dumps_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2, sort_keys=True)


def require_path(path, kind: str = "dir", what: str = "") -> Path:
    """The one check of a path argument, used by every verb: ``kind`` is "dir", "file" or "any".

    Raises:
        ConfigError: the path does not exist or is not of that kind; the message names it (and ``what``).
    """
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    if kind == "dir" and not p.is_dir():
        raise ConfigError(f"{label}: no such folder" if not p.exists() else f"{label}: not a folder")
    if kind == "file" and not p.is_file():
        raise ConfigError(f"{label}: no such file" if not p.exists() else f"{label}: not a file")
    if kind == "any" and not p.exists():
        raise ConfigError(f"{label}: does not exist")
    return p

