"""Typed training configs: one frozen dataclass per script, overridable from JSON and the CLI.

Unknown keys and wrong types are errors, not silently ignored (cf. nanoGPT's configurator, done with
a typed object instead of ``exec``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


def _coerce(name: str, kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None:
            return None
        return _coerce(name, options[0], value)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, list | tuple):
            raise TypeError(f"config key {name!r} must be a list, got {value!r}")
        (inner, *_rest) = typing.get_args(kind) or (Any,)
        return tuple(_coerce(name, inner, v) for v in value)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise TypeError(f"config key {name!r} must be a bool, got {value!r}")
        return value
    if kind in (int, float, str):
        if isinstance(value, str) and kind is not str:
            try:
                value = kind(value)
            except ValueError as exc:
                raise TypeError(f"config key {name!r} must be {kind.__name__}, got {value!r}") from exc
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"config key {name!r} must be {kind.__name__}, got {value!r}")
        return value
    return value


def build_config(cls: type[C], overrides: dict[str, Any]) -> C:
    """Builds ``cls`` from ``overrides``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise KeyError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    values = {k: _coerce(k, hints[k], v) for k, v in overrides.items()}
    return cls(**values)


def parse_config(cls: type[C], argv: list[str] | None = None, description: str = "") -> C:
    """Parses ``--config FILE.json``, ``--key value`` overrides and ``--dry-run`` into ``cls``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help="JSON file of config overrides")
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "dry_run":
            parser.add_argument(flag, dest=field.name, action="store_true", default=None,
                                help="train one batch, export and reload, then stop")
        else:
            parser.add_argument(flag, dest=field.name, default=None,
                                help=f"(default: {field.default!r})")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.config is not None:
        overrides.update(json.loads(args.config.read_text()))
    overrides.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return build_config(cls, overrides)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
