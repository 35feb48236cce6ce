"""Plain-data configs: frozen dataclasses built from TOML/JSON dicts with messages a user can act on.

Every stage config, the calibration and evaluation settings use `from_dict`: unknown keys are
refused (a typo must not silently become a default), values are coerced to the field's type,
and `__post_init__` checks ranges. Errors are `RecipeError` with the place in the recipe.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class RecipeError(ValueError):
    """A recipe or stage config that cannot run; the message says what to change."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(value, args[0], where)
        for a in args:
            try:
                return _coerce(value, a, where)
            except RecipeError:
                continue
        raise RecipeError(f"{where}: {value!r} is not a valid value")
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected text, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict | None, where: str) -> T:
    """Build a config dataclass from plain data, refusing unknown keys."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise RecipeError(f"{where}: {exc}") from None


def to_dict(config: Any) -> dict:
    """Plain data for TOML/JSON (tuples become lists, None values are dropped)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if v is None:
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)
