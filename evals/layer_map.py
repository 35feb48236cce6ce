"""A layer-range map: one setting per decoder layer, written as ranges (the per-layer field type).

A stage field of this type (width's `patterns`, gptq's `layer_bits` and `layer_group_size`) is a
TOML inline table whose keys are layer numbers or inclusive ranges and whose values are the
setting for those layers:

    patterns = { "0-3" = "none", "4-13" = "1:8", "14-27" = "2:4" }
    layer_bits = { "0-3" = 8, "4-25,28" = 4, "26-27" = 16 }

- A key is `"7"`, `"0-3"` (inclusive) or several of them joined by commas (`"4-13,20"`: the same
  value for all of them). Bare TOML keys work too (`0-3 = "none"`). Layer numbers are those of the
  model the stage receives (after any depth stage before it).
- No layer may be named twice (overlapping keys are refused); a layer the map does not name takes
  the stage's single setting (width: `pattern`/`ratio`, or dense; gptq: `bits`/`group_size`).
- `to_dict()` is canonical: sorted by layer, adjacent ranges with equal values merged, so session
  records and sweep node keys do not depend on how the map was written.
- The text form (the lab's form, `parse`): `0-3=none, 4-13=1:8` (entries separated by commas or
  semicolons).

Parsing refuses bad keys, overlaps and values of the wrong type with one-line `RecipeError`s; what a
value may be beyond its type (an N:M pattern, a bit width) is checked by the stage's config. Checking
the keys against a model's layer count is `check_layers`, which the stages call from their
`check_for` hook (before any weights load).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from frankenlab.evals.errors import RecipeError

_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def _parse_key(key: Any, where: str) -> list[tuple[int, int]]:
    if isinstance(key, bool):
        raise RecipeError(f"{where}: {key!r} is not a layer number or range")
    if isinstance(key, int):
        if key < 0:
            raise RecipeError(f"{where}: layer {key} is negative; layers are numbered from 0")
        return [(key, key)]
    if not isinstance(key, str) or not key.strip():
        raise RecipeError(f'{where}: {key!r} is not a layer number or range (write e.g. "0-3", "7" or "4-13,20")')
    out = []
    for part in key.split(","):
        m = _RANGE.fullmatch(part)
        if m is None:
            raise RecipeError(
                f"{where}: key {key!r}: {part.strip()!r} is not a layer number or range "
                '(write e.g. "0-3", "7" or "4-13,20")'
            )
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise RecipeError(f"{where}: key {key!r}: the range {a}-{b} runs backwards; write {b}-{a}")
        out.append((a, b))
    return out


def range_text(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


class LayerMap:
    """An immutable map from layer ranges to values (see the module docstring).

    Subclasses say what a value is (`value`): `IntLayerMap`, `TextLayerMap`."""

    WHAT = "value"  # what a value is, for messages

    __slots__ = ("_ranges",)

    def __init__(self, ranges: tuple[tuple[int, int, Any], ...] = ()):
        self._ranges = _canonical(ranges)

    # -- values -----------------------------------------------------------------------------------
    @classmethod
    def value(cls, v: Any, where: str) -> Any:
        """The value as stored (coerced); RecipeError when it is not of the map's type."""
        return v

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: Any, where: str = "layers") -> LayerMap:
        """A map from a table ({key: value}), the text form ("0-3=none, 4-13=1:8") or another map."""
        if isinstance(data, LayerMap):
            if type(data) is cls:
                return data
            data = data.to_dict()
        if isinstance(data, str):
            data = parse_text(data, where)
        if not isinstance(data, dict):
            raise RecipeError(
                f'{where}: expected a table of layer ranges, e.g. {{ "0-3" = ..., "4-13" = ... }}, got {data!r}'
            )
        if not data:
            raise RecipeError(f"{where}: the map names no layer; leave it out instead")
        owner: dict[int, str] = {}
        ranges = []
        for key, raw in data.items():
            spans = _parse_key(key, where)
            v = cls.value(raw, f"{where}[{str(key).strip()!r}]" if isinstance(key, str) else f"{where}[{key}]")
            for a, b in spans:
                for other_a, other_b, other_key in ((x, y, k) for (x, y), k in owner.items()):
                    if a <= other_b and other_a <= b:
                        shared = range_text(max(a, other_a), min(b, other_b))
                        raise RecipeError(
                            f"{where}: keys {other_key!r} and {str(key)!r} both name layer(s) {shared}; "
                            "name each layer once"
                        )
                owner[(a, b)] = str(key)
                ranges.append((a, b, v))
        return cls(tuple(ranges))

    @classmethod
    def from_layers(cls, values: dict[int, Any], where: str = "layers") -> LayerMap:
        """From {layer: value} (one entry per layer), e.g. a planner's choice."""
        return cls.parse({int(i): v for i, v in values.items()}, where)

    def map_values(self, fn: Callable[[Any, str], Any], where: str = "layers") -> LayerMap:
        """The same ranges with fn(value, where_of_that_key) as values (a stage's normalizer)."""
        return type(self)(tuple((a, b, fn(v, f"{where}[{range_text(a, b)!r}]")) for a, b, v in self._ranges))

    # -- reading ----------------------------------------------------------------------------------
    def for_layer(self, i: int, default: Any = None) -> Any:
        for a, b, v in self._ranges:
            if a <= i <= b:
                return v
        return default

    def items(self) -> Iterator[tuple[int, int, Any]]:
        """(first, last, value) per canonical range, in layer order."""
        return iter(self._ranges)

    def layers(self) -> list[int]:
        """Every layer the map names, in order."""
        return [i for a, b, _ in self._ranges for i in range(a, b + 1)]

    def values(self) -> list:
        """The distinct values, in order of first appearance."""
        out = []
        for _, _, v in self._ranges:
            if v not in out:
                out.append(v)
        return out

    @property
    def last_layer(self) -> int:
        return self._ranges[-1][1]

    def check_layers(self, n_layers: int, where: str = "layers") -> None:
        """RecipeError when a key names a layer the model (as the stage receives it) does not have."""
        if self._ranges and self.last_layer >= n_layers:
            a, b, _ = next(r for r in self._ranges if r[1] >= n_layers)
            raise RecipeError(
                f"{where}: layer {max(a, n_layers)} (key {range_text(a, b)!r}) does not exist: the model has "
                f"{n_layers} layers here (0-{n_layers - 1}), counted after any depth stage before this one"
            )

    def to_dict(self) -> dict[str, Any]:
        """Canonical plain data: sorted, adjacent equal values merged, keys "a-b" or "a"."""
        return {range_text(a, b): v for a, b, v in self._ranges}

    def text(self) -> str:
        """The form's text: "0-3=none, 4-13=1:8"."""
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerMap) and self._ranges == other._ranges

    def __hash__(self) -> int:
        return hash(self._ranges)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text()!r})"

    def __len__(self) -> int:
        return len(self.layers())


def _canonical(ranges) -> tuple[tuple[int, int, Any], ...]:
    out: list[list] = []
    for a, b, v in sorted(ranges, key=lambda r: (r[0], r[1])):
        if out and out[-1][1] + 1 == a and out[-1][2] == v and type(out[-1][2]) is type(v):
            out[-1][1] = b
        else:
            out.append([a, b, v])
    return tuple((a, b, v) for a, b, v in out)


def parse_text(text: str, where: str = "layers") -> dict[str, str]:
    """'0-3=none, 4-13,20=1:8' -> {"0-3": "none", "4-13,20": "1:8"} (values stay text)."""
    out: dict[str, str] = {}
    pending: list[str] = []  # key parts before the one holding "=" ("4-13" in "4-13,20=1:8")
    for token in (t.strip() for t in re.split(r"[,;\n]", text)):
        if not token:
            continue
        if "=" not in token:
            pending.append(token)
            continue
        key, _, value = token.partition("=")
        key = ",".join([*pending, key.strip()])
        pending = []
        if not key or not value.strip():
            raise RecipeError(f"{where}: {token!r} needs a layer range and a value, e.g. 0-3=none")
        if key in out:
            raise RecipeError(f"{where}: {key!r} is given twice; name each layer once")
        out[key] = value.strip()
    if pending:
        raise RecipeError(f"{where}: {', '.join(pending)!r} has no value; write e.g. {pending[0]}=...")
    if not out:
        raise RecipeError(f"{where}: give layer ranges and values, e.g. 0-3=none, 4-13=1:8")
    return out


class IntLayerMap(LayerMap):
    """Whole-number values (bit widths, group sizes); the text form's "8" counts as 8."""

    WHAT = "whole number"
    __slots__ = ()

    @classmethod
    def value(cls, v: Any, where: str) -> int:
        if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise RecipeError(f"{where}: expected a whole number, got {v!r}")
        return v


class TextLayerMap(LayerMap):
    """Text values (N:M patterns, "none"), stripped and lower-cased."""

    WHAT = "text"
    __slots__ = ()

    @classmethod
    def value(cls, v: Any, where: str) -> str:
        if not isinstance(v, str) or not v.strip():
            raise RecipeError(f"{where}: expected text, got {v!r}")
        return v.strip().lower()


def is_layer_map_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, LayerMap)
