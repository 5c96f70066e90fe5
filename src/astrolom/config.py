"""Typed configuration: nested dataclasses, loadable from YAML, overridable with `section.field=value` strings.

Never `exec`: values are parsed with YAML's safe loader, and unknown keys are errors (a silently ignored flag is
worse than a crash).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def comma_list(text: str, type: Callable[[str], Any] = str, name: str = "value") -> tuple:
    """The one parser of comma-separated options ("g,r,z", "4,16,64"): stripped items, empty ones dropped.

    Args:
        type: applied to each item (str, int, float, ...).
        name: the option's name for the error message (e.g. "--targets").

    Raises:
        ValueError: naming the option and the item that `type` rejects.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return tuple(type(t) for t in items)
    except ValueError as err:
        raise ValueError(
            f"{name}: {text!r} is not a comma-separated list of {getattr(type, '__name__', 'values')} ({err})"
        ) from err


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(tp, value, where: str):
    """Convert a YAML/JSON value to the annotated field type (nested dataclasses, tuples, optionals)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = comma_list(value, name=where)
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        items = [_coerce(elem, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, (int, str)) and not isinstance(value, bool):
        return int(value)
    if tp is bool and isinstance(value, str):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is str and value is not None:
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys raise."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of `cfg` with `a.b.c=value` overrides applied (value parsed as YAML)."""
    data = dataclasses.asdict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"override {item!r}: {p!r} is not a config section")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"override {item!r}: unknown key {parts[-1]!r}; valid keys are {sorted(node)}")
        node[parts[-1]] = yaml.safe_load(raw)
    return from_dict(type(cfg), data)


def load_yaml(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    cfg = from_dict(cls, data, where=str(path))
    return apply_overrides(cfg, overrides or [])


def save_yaml(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
