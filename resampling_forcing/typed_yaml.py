"""Typed dataclasses from YAML mappings, and `key.path=value` overrides (generic: config.py declares the
sections and their rules).

    data = apply_overrides(yaml_mapping, ["train.lr=1e-4"])   # a deep copy, overrides set in place
    cfg = build(Config, data, "")                              # every value checked against its annotation

A typo or a wrong type fails with the full key path (`train.lr: expected float, got str 'abc'`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the key path and the fix."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclass(frozen=True)
class _OverrideScalar:
    """A command-line value YAML read as a non-string scalar (`no` -> False, `2024` -> 2024), with its
    text: a string field takes the text (train.mixed_precision=no, train.run_dir=2024)."""

    value: Any
    raw: str


def _yaml_hint(value: Any) -> str:
    return (" (YAML reads yes/no/on/off/true/false as booleans: quote the word, e.g. \"no\")"
            if isinstance(value, bool) else "")


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; build nested dataclasses. Errors name `path`."""
    if isinstance(value, _OverrideScalar):
        try:
            return coerce(value.value, tp, path)
        except ConfigError as first:
            try:
                return coerce(value.raw, tp, path)
            except ConfigError:
                raise first from None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(x, bool) for x in args):
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{_yaml_hint(value)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return build(tp, value, path)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: take it as the number it spells
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}{_yaml_hint(value)}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


def build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; valid keys here: {sorted(names)}")
    kwargs = {k: coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own rules (__post_init__); its message names the key path
        raise ConfigError(str(e)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem}); check its brackets and "
                          "quotes, and quote the whole key=value for the shell") from None
    # (YAML reads 1e-4 as a string, no dot: a float field takes it as the number it spells, coerce)
    if isinstance(value, (bool, int, float)):
        value = _OverrideScalar(value, raw.strip())  # a string field takes the text instead
    return key.strip().split("."), value


def override_value(text: str) -> tuple[list[str], Any]:
    """`key.path=value` -> (keys, the value as YAML reads it): for callers that compare an override with
    a resolved config."""
    keys, value = parse_override(text)
    return keys, value.value if isinstance(value, _OverrideScalar) else value


def set_path(data: dict, keys: list[str], value: Any, new_section: Callable[[str], Any] = lambda key: {}) -> None:
    """Set data[k0][k1]... = value; integer keys index lists (train.stages.1.steps=500). A missing or null
    section on the way is created as `new_section(key)`."""
    node: Any = data
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"override {'.'.join(keys)}: {where} is not an index of a list of {len(node)}")
            k = int(k)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[:depth])} is not a section")
        if last:
            node[k] = value
            return
        if isinstance(node, dict) and node.get(k) is None:
            node[k] = new_section(k)
        node = node[k]


def apply_overrides(data: dict, overrides, new_section: Callable[[str], Any] = lambda key: {}) -> dict:
    """A deep copy of the mapping `data` with each `key.path=value` of `overrides` set (see `set_path`)."""
    data = _deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        set_path(data, keys, value, new_section)
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data
