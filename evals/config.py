"""Plain-data configs: frozen dataclasses built from TOML/JSON dicts with messages a user can act on.

Every stage config, the calibration and evaluation settings use `from_dict`: unknown keys are
refused (a typo must not silently become a default), values are coerced to the field's type,
and `__post_init__` checks ranges. A config with a classmethod `expand(data) -> data` (the
evaluation's presets) gets to fill in keys before that. Errors are `RecipeError` with the place in the recipe.

Fields describe themselves (`option(default, help=..., label=..., form=...)`, as PEFT's
`field(metadata={"help": ...})` does) so that forms, help screens and docs are built from the
config rather than from tables kept beside it: `config_fields(cls)` lists them.
It lives in `evals/`, the lowest layer, because the evaluation settings are such a config too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from frankenlab.evals.errors import RecipeError
from frankenlab.evals.layer_map import LayerMap, is_layer_map_type

T = TypeVar("T")
_MISSING = dataclasses.MISSING


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
        raise RecipeError(f"{where}: expected {' or '.join(_expected(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:  # a word a field takes beside its type: steps = "auto"
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
        raise RecipeError(f"{where}: expected {_expected(tp)}, got {value!r}")
    if is_layer_map_type(tp):  # a layer-range map (evals.layer_map): a table or its text form
        return tp.parse(value, where)
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


def _expected(tp: Any) -> str:
    """What a value of type `tp` is, for a message: "a whole number", "text", "\"auto\""."""
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(f'"{w}"' for w in typing.get_args(tp))
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
    return names.get(tp, "a list" if typing.get_origin(tp) in (tuple, list) else getattr(tp, "__name__", str(tp)))


def literal_words(tp: Any) -> tuple:
    """The words a field takes beside its type (`int | Literal["auto"] | None`: ("auto",))."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return tuple(typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return tuple(w for a in typing.get_args(tp) for w in literal_words(a))
    return ()


def from_dict(cls: type[T], data: dict | None, where: str) -> T:
    """Build a config dataclass from plain data, refusing unknown keys."""
    data = dict(data or {})
    expand = getattr(cls, "expand", None)  # presets: a config may fill in keys from a named set first
    if callable(expand):
        data = dict(expand(data))
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
        out[f.name] = list(v) if isinstance(v, tuple) else v.to_dict() if isinstance(v, LayerMap) else v
    return out


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)


# -- self-describing fields -------------------------------------------------------------------------
def option(
    default: Any = _MISSING,
    *,
    help: str,
    label: str | None = None,
    form: bool = True,
    choices: tuple | None = None,
    default_factory: Any = _MISSING,
) -> Any:
    """A dataclass field that says what it is for: `help` (one sentence, shown beside the input),
    `label` (the form's short name; default: the field name with spaces), `form` (False = a
    power-user setting that recipes may set but the lab's form does not show), `choices` (the
    allowed values, shown as a select)."""
    meta = {"help": help, "label": label, "form": form, "choices": tuple(choices) if choices else None}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One config field as a form or a help screen needs it."""

    name: str
    label: str
    help: str
    type: Any  # the resolved annotation, e.g. int, float | None, tuple[str, ...]
    base: Any  # the scalar type inside it: int, float, bool, str, or tuple for lists
    optional: bool  # None is allowed
    default: Any
    form: bool = True
    choices: tuple | None = None
    words: tuple = ()  # words taken beside the type (steps: "auto"); a form's text input accepts them


def _base_type(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None) and typing.get_origin(a) is not typing.Literal]
        args = args or [str]
        inner, _ = _base_type(args[0]) if len(args) == 1 else (str, False)
        return inner, type(None) in typing.get_args(tp)
    if origin in (tuple, list):
        return tuple, False
    return tp, False


def config_fields(cls: type) -> list[FieldInfo]:
    """The init fields of a config dataclass, in order, with their help text and form flags.

    A field declared without `option(...)` still appears (label = its name, no help), so an
    older or third-party config is shown rather than hidden."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = f.metadata or {}
        base, optional = _base_type(hints[f.name])
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append(
            FieldInfo(
                f.name,
                meta.get("label") or f.name.replace("_", " "),
                meta.get("help", ""),
                hints[f.name],
                base,
                optional,
                default,
                bool(meta.get("form", True)),
                meta.get("choices"),
                literal_words(hints[f.name]),
            )
        )
    return out
