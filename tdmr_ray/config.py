"""Job settings as typed dataclasses, filled from defaults < preset < YAML file < command-line flags.

Nested dataclass fields become YAML sections and dotted flags (``--cloud.distill-lr 0.001``).
An unknown YAML key or flag is an error that names it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    pass


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_type(tp):
    """Optional[X] / X | None -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return tp


def _coerce(value, tp, key: str):
    tp = _base_type(tp)
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if tp is str and isinstance(value, bool):  # (str(False) would pass as the string "False")
        raise ConfigError(f"config key {key!r}: got the boolean {value} where a string is expected; YAML reads "
                          f"unquoted off/on/yes/no/true/false as booleans: quote it (e.g. 'off')")
    if tp in (int, float) and isinstance(value, bool):  # (YAML true would pass as 1)
        raise ConfigError(f"config key {key!r}: got the boolean {value} where a number is expected")
    if (tp in (int, float, str) and isinstance(value, (dict, list, tuple))) or (
            origin in (list, tuple) and isinstance(value, dict)):
        raise ConfigError(f"config key {key!r}: got a {type(value).__name__} ({value!r}) where a "
                          f"{getattr(tp, '__name__', tp)} is expected")
    try:
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(tp) or (str,)
            items = value.split(",") if isinstance(value, str) else list(value)
            out = [_coerce(v.strip() if isinstance(v, str) else v, item_tp, key) for v in items if v != ""]
            return tuple(out) if origin is tuple else out
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if tp in (int, float, str):
            return tp(value)
        if origin is typing.Literal:
            if value not in typing.get_args(tp):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def _apply(obj, values: dict, source: str, prefix: str = ""):
    """Return a copy of dataclass ``obj`` with ``values`` (nested dict) applied."""
    types = _field_types(type(obj))
    changes = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        full = f"{prefix}{key}"
        if key not in types:
            known = ", ".join(k.replace("_", "-") for k in types)
            raise ConfigError(f"unknown key {full.replace('_', '-')!r} in {source}; known keys: {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full!r} in {source} must be a section (mapping), got {value!r}")
            changes[key] = _apply(current, value, source, f"{full}.")
        else:
            changes[key] = _coerce(value, types[key], full)
    return dataclasses.replace(obj, **changes)


def _flags(cls, prefix=""):
    """(dotted key, type) for every leaf field."""
    for name, tp in _field_types(cls).items():
        default = {f.name: f for f in dataclasses.fields(cls)}[name]
        sub = default.default_factory() if default.default_factory is not dataclasses.MISSING else default.default
        if dataclasses.is_dataclass(sub):
            yield from _flags(type(sub), f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", tp


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_config(cls: type[C], argv: Sequence[str] | None = None, presets: dict[str, dict] | None = None,
                description: str = "") -> C:
    """Build ``cls`` from presets, ``--config FILE.yaml`` and flags. ``cls`` must have a ``preset`` field."""
    presets = presets or {}
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML file whose keys mirror the flags")
    for key, tp in _flags(cls):
        flag = "--" + key.replace("_", "-")
        base = _base_type(tp)
        if key == "preset" and presets:
            parser.add_argument(flag, dest=key, choices=sorted(presets), help="settings preset")
        elif base is bool:
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, dest=key, metavar=getattr(base, "__name__", "VALUE").upper())
    args = vars(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    config_file = args.pop("config", None)
    file_values = {}
    if config_file:
        try:
            file_values = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        if not isinstance(file_values, dict):
            raise ConfigError(f"{config_file}: top level must be a mapping of keys to values")
    flag_values = _nest(args)
    preset = flag_values.get("preset", file_values.get("preset", getattr(cls(), "preset", None)))
    if presets and (not isinstance(preset, str) or preset not in presets):
        raise ConfigError(f"unknown preset {preset!r}; known: {sorted(presets)}")
    cfg = cls()
    cfg = _apply(cfg, presets.get(preset, {}), f"preset {preset!r}")
    cfg = _apply(cfg, file_values, str(config_file))
    cfg = _apply(cfg, flag_values, "command-line flags")
    if hasattr(cfg, "with_explicit_keys"):  # a config that must know what the user set (FleetConfig)
        cfg = cfg.with_explicit_keys(sorted(set(flatten(file_values)) | set(flatten(flag_values))))
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: C, overrides: dict, source: str = "overrides") -> C:
    """A copy of ``cfg`` with dotted-key overrides applied (``{"cloud.edge_lr": 1e-3}``); unknown keys fail."""
    return _apply(cfg, _nest(overrides), source)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested mapping -> dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``); dashes become underscores."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{str(k).replace('-', '_')}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out
