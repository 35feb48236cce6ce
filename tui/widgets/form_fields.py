"""Form inputs built from a config's own field metadata (`evals.config.config_fields`).

`FieldEditor` is one field: a Select when the field declares `choices`, a Checkbox for a bool,
an Input with a validator otherwise. Its label and help come from the field's `option(...)`
(the help as the input's tooltip and as a hint line under it while it has focus); the reason a
value is refused is shown under it. `ConfigEditor` lays out the `form=True` fields of one config
dataclass over a base config that supplies every other field, so the power settings a loaded
recipe carries (and the form never shows) survive a round trip through the form.

Values are checked by the config class itself through `from_dict`, the validation a recipe file
gets in `frankenlab run`, so the reason under a field is the one the runner would print.
A field keeps its value in Python until its widget is mounted, so a form filled by `load()` can
be built at once, before the screen has drawn it.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.validation import ValidationResult, Validator
from textual.widgets import Checkbox, Input, Label, Select, Static

from frankenlab.evals.config import FieldInfo, config_fields, from_dict
from frankenlab.evals.errors import RecipeError
from frankenlab.evals.layer_map import LayerMap, is_layer_map_type
from frankenlab.tui.widgets.tickbox import TickBox


def field_text(value: Any) -> str:
    """How a value reads in a text input: empty for None, a comma list for a tuple, "0-3=none, 4-13=1:8"
    for a layer-range map (or its table)."""
    if value is None:
        return ""
    if isinstance(value, LayerMap):
        return value.text()
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _list_item_type(tp: Any) -> Any:
    for t in (tp, *typing.get_args(tp)):
        if typing.get_origin(t) in (tuple, list):
            args = [a for a in typing.get_args(t) if a is not Ellipsis]
            return args[0] if args else str
    return str


def _number(text: str, tp: type, label: str, words: tuple = ()) -> Any:
    try:
        return tp(text)
    except ValueError:
        kind = " or ".join(["a whole number" if tp is int else "a number", *(f'"{w}"' for w in words)])
        raise RecipeError(f"{label}: expected {kind}, got {text!r}") from None


def parse_text(info: FieldInfo, text: str) -> Any:
    """The typed value of a text input (None for an empty optional field); RecipeError says why not."""
    text = text.strip()
    if not text:
        if info.optional:
            return None
        if info.base in (str, tuple):
            return "" if info.base is str else []
        raise RecipeError(f"{info.label}: give a value")
    if text in info.words:  # a word the field takes beside its type (steps: "auto")
        return text
    if info.base in (int, float):
        return _number(text, info.base, info.label, info.words)
    if is_layer_map_type(info.base):  # "0-3=none, 4-13=1:8": checked here, kept as plain data (a table)
        return info.base.parse(text, info.label).to_dict()
    if info.base is tuple:
        item = _list_item_type(info.type)
        items = [v.strip() for v in text.split(",") if v.strip()]
        return [_number(v, item, info.label) for v in items] if item in (int, float) else items
    return text


def strip_where(message: str, where: str) -> str:
    """`from_dict` prefixes its messages with the place in the recipe; under a field it is noise."""
    return message[len(where) + 2 :] if message.startswith(f"{where}: ") else message


class FnValidator(Validator):
    """Runs `check(text)`; a RecipeError/ValueError message becomes the input's failure reason."""

    def __init__(self, check: Callable[[str], Any]):
        super().__init__()
        self.check = check

    def validate(self, value: str) -> ValidationResult:
        try:
            self.check(value)
        except (RecipeError, ValueError, TypeError) as exc:
            return self.failure(str(exc))
        return self.success()


class FieldEditor(Vertical):
    """A label, the input the field's type calls for, its help while focused, and the refusal reason."""

    def __init__(
        self,
        info: FieldInfo,
        value: Any,
        check: Callable[[Any], Any] | None = None,
        *,
        prefix: str,
        input_id: str | None = None,
    ):
        self.input_id = input_id or f"{prefix}-{info.name.replace('_', '-')}"
        super().__init__(classes="field", id=f"{self.input_id}-field")
        self.info, self.check = info, check
        self._value = value
        self._widget: Input | Select | Checkbox | None = None

    def compose(self) -> ComposeResult:
        info = self.info
        with Horizontal(classes="field-row"):
            yield Label(info.label, classes="field-label", markup=False)
            if info.choices:
                value = self._value if self._value in info.choices else Select.NULL
                widget = Select(
                    [(str(c), c) for c in info.choices],
                    value=value,
                    compact=True,
                    id=self.input_id,
                    allow_blank=info.optional or value is Select.NULL,
                )
            elif info.base is bool:
                widget = TickBox("", bool(self._value), compact=True, id=self.input_id)
            else:
                widget = Input(
                    field_text(self._value),
                    placeholder=" or ".join((["empty"] if info.optional else []) + list(info.words)),
                    validators=[FnValidator(self._check_text)],
                    validate_on=["changed", "submitted"],
                    compact=True,
                    id=self.input_id,
                )
            if info.help:
                widget.tooltip = info.help
            self._widget = widget
            yield widget
        if info.help:
            yield Static(info.help, classes="field-help hint", markup=False)
        error = Static("", classes="field-error", markup=False)
        error.display = False
        yield error

    # -- value -----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._widget is not None and self._widget.is_mounted

    @property
    def value(self) -> Any:
        """The typed value (RecipeError when the text is not one)."""
        if not self.ready:
            return self._value
        w = self._widget
        if isinstance(w, Select):
            return None if w.is_blank() else w.value
        if isinstance(w, Checkbox):
            return w.value
        return parse_text(self.info, w.value)

    def set_value(self, value: Any) -> None:
        self._value = value
        if not self.ready:
            return
        w = self._widget
        if isinstance(w, Select):
            if value in (self.info.choices or ()):
                w.value = value
            elif self.info.optional:
                w.clear()
        elif isinstance(w, Checkbox):
            w.value = bool(value)
        else:
            w.value = field_text(value)

    @property
    def widget(self) -> Input | Select | Checkbox | None:
        return self._widget

    # -- checks ----------------------------------------------------------------------------------
    def _check_text(self, text: str) -> None:
        value = parse_text(self.info, text)
        if self.check:
            self.check(value)

    def problem(self) -> str | None:
        """Why the current value is refused, or None."""
        try:
            value = self.value
            if self.check:
                self.check(value)
        except (RecipeError, ValueError, TypeError) as exc:
            return str(exc)
        return None

    def show_problem(self) -> None:
        if not self.ready:
            return
        reason = self.problem()
        error = self.query_one(".field-error", Static)
        error.update(reason or "")
        error.display = bool(reason)
        self.set_class(bool(reason), "invalid")

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _changed(self) -> None:
        self.show_problem()


class ConfigEditor(Vertical):
    """The `form=True` fields of a config dataclass, less `skip`; `data()` is every field as plain data."""

    def __init__(
        self,
        cls: type,
        base: Any,
        *,
        prefix: str,
        where: str,
        skip: frozenset[str] | set = frozenset(),
        id: str | None = None,
        classes: str = "",
    ):
        super().__init__(id=id, classes=classes)
        self.cls, self.base, self.where = cls, base, where
        self.infos = config_fields(cls)
        start = self.base_data()
        self.fields: dict[str, FieldEditor] = {
            f.name: FieldEditor(f, start.get(f.name, f.default), self._checker(f.name), prefix=prefix)
            for f in self.infos
            if f.form and f.name not in skip
        }

    def compose(self) -> ComposeResult:
        yield from self.fields.values()

    def base_data(self) -> dict:
        """Every init field of the base config (the defaults when there is none)."""
        if self.base is None:
            return {f.name: f.default for f in self.infos}
        return {f.name: getattr(self.base, f.name) for f in self.infos}

    def data(self) -> dict:
        """Plain data for `from_dict`: the shown fields as typed, the others from the base config."""
        out = self.base_data()
        for name, fe in self.fields.items():
            out[name] = fe.value
        return out

    def load(self, config: Any) -> None:
        self.base = config
        for name, fe in self.fields.items():
            fe.set_value(getattr(config, name))

    def _checker(self, name: str) -> Callable[[Any], None]:
        """Check one field as the config would: the base config with only this field changed."""

        def check(value: Any) -> None:
            ref = self.base_data() if self.base is not None else self._current_others(name)
            ref[name] = value
            try:
                from_dict(self.cls, ref, self.where)
            except RecipeError as exc:
                raise RecipeError(strip_where(str(exc), self.where)) from None

        return check

    def _current_others(self, name: str) -> dict:
        out = {}
        for other, fe in self.fields.items():
            if other != name:
                try:
                    out[other] = fe.value
                except RecipeError:
                    pass
        return out

    def problems(self) -> list[str]:
        return [p for p in (fe.problem() for fe in self.fields.values()) if p]

    def show_problems(self) -> None:
        for fe in self.fields.values():
            fe.show_problem()
