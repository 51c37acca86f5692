"""Typed configs as flat ``{"a.b": "value"}`` dicts: for MLflow params and for comparing two runs."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields, is_dataclass
from typing import Any


def json_safe(value: Any) -> Any:
    """Plain JSON values (tuples to lists, other objects to strings): dataclass contents, results."""
    return json.loads(json.dumps(value, default=str))


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested dataclasses / dicts to strings: {"train.lr": "0.001", ...} (MLflow's 6000-char limit)."""
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    flat: dict[str, str] = {}
    if isinstance(config, Mapping):
        for key, value in config.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) or (is_dataclass(value) and not isinstance(value, type)):
                flat.update(flatten(value, name))
            else:
                flat[name] = str(value)[:6000]
    return flat


def differences(before: Mapping[str, str], now: Mapping[str, str], may_change: Iterable[str] = ()) -> list[str]:
    """``name: before -> now`` for every setting that differs, except those in ``may_change``."""
    allowed = set(may_change)
    keys = sorted((set(before) | set(now)) - allowed)
    return [
        f"{key}: {before.get(key, '(unset)')} -> {now.get(key, '(unset)')}"
        for key in keys
        if before.get(key) != now.get(key)
    ]


def from_dict(cls: type, data: Mapping[str, Any]):
    """The dataclass ``cls`` from ``asdict``'s output: nested dataclass fields (also optional ones)
    are rebuilt, lists become tuples where the field is a tuple."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        options = (
            typing.get_args(hint)
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            else (hint,)
        )
        nested = next((t for t in options if is_dataclass(t)), None)
        if nested is not None and isinstance(value, Mapping):
            value = from_dict(nested, value)
        elif isinstance(value, list) and any(typing.get_origin(t) is tuple for t in options):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


SEED_RANGE = (0, 2**32 - 1)  # what numpy's and torch's generators take


def check_numbers(config: Any, prefix: str = "") -> None:
    """Every float setting of a (nested) dataclass config is finite, and every seed is in
    SEED_RANGE: ``--lr inf`` or ``--sigma nan`` passes a ``> 0`` check and trains to NaN weights,
    and a seed out of range fails deep inside numpy after the data is loaded."""
    from segflow.errors import SegflowError

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        setting = f"--{prefix}{f.name.replace('_', '-')}"
        if is_dataclass(value) and not isinstance(value, type):
            check_numbers(value, f"{prefix}{f.name.replace('_', '-')}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise SegflowError(f"{setting} must be a finite number (got {value}).")
        elif f.name == "seed" and isinstance(value, int) and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise SegflowError(f"{setting} must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (got {value}).")


def from_options(config: type, options: dict, used: tuple[str, ...] = ("track",), **more):
    """A stage's typed config from a command's or a component's options (``locals()`` taken first
    thing): every option named like one of the config's fields fills it (options and fields share
    their names, so a new setting is a field plus the option); ``more`` adds the rest. An option
    that is neither a field, in ``more``, nor ``used`` by the caller itself is a bug (a renamed
    field): refused, not dropped."""
    names = {f.name for f in fields(config)} - set(more)
    unplaced = sorted(set(options) - names - set(more) - set(used))
    if unplaced:
        raise TypeError(f"{config.__name__} has no field for the option(s) {', '.join(unplaced)}")
    return config(**{k: v for k, v in options.items() if k in names}, **more)
