"""One stage of the recipe in the form, built from its kind's registry entry alone.

The generic part is a `ConfigEditor` over the kind's `Config`: one input per `form=True` field.
The fields the kind lists in `FORM_CUSTOM` go to the custom editor that owns them (the layer
plan, the N:M picker; `stage_custom.py`), or are kept as loaded when none does. Fields with
`form=False` and anything else the form does not show come from the stage's config as loaded,
so a recipe survives a load and build unchanged. The editor itself holds no order: the form
numbers it and moves it (order is data).
"""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Static

from frankenlab.evals.config import from_dict
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.stages import stage_kind
from frankenlab.tui.widgets.form_fields import ConfigEditor, FieldEditor, strip_where
from frankenlab.tui.widgets.stage_custom import custom_editor_for


def starting_config(stype, custom) -> Any:
    """The config a newly added stage shows: its custom editor's start data, else the defaults."""
    try:
        return from_dict(stype.Config, dict(custom.START) if custom else {}, stype.name)
    except RecipeError:
        return None  # a kind with required fields: the editor starts empty and says what is missing


class StageEditor(Vertical):
    """A bordered box: the stage's description, move/remove buttons, its fields, and what is wrong."""

    class Move(Message):
        def __init__(self, editor: StageEditor, delta: int):
            super().__init__()
            self.editor, self.delta = editor, delta

    class Remove(Message):
        def __init__(self, editor: StageEditor):
            super().__init__()
            self.editor = editor

    def __init__(self, kind: str, config: Any = None, stage_name: str = "", *, uid: int):
        super().__init__(id=f"stage-{uid}", classes=f"stage kind-{kind}")
        self.kind, self.stage_name = kind, stage_name
        self.stype = stage_kind(kind)
        custom_cls = custom_editor_for(self.stype.form_custom)
        if config is None:
            config = starting_config(self.stype, custom_cls)
        self.custom = custom_cls(self.stype.Config, config, prefix=kind) if custom_cls else None
        self.generic = ConfigEditor(
            self.stype.Config, config, prefix=kind, where=kind, skip=self.stype.form_custom, classes="stage-fields"
        )
        self.index = 0
        self.focus_when_mounted = False  # a stage the user just added takes the cursor

    def compose(self) -> ComposeResult:
        with Horizontal(classes="stage-head"):
            yield Static(self.stype.description, classes="stage-desc", markup=False)
            for bid, label, tip in (
                ("stage-up", "↑", "move this stage up (ctrl+up)"),
                ("stage-down", "↓", "move this stage down (ctrl+down)"),
                ("stage-remove", "✕", "remove this stage (ctrl+delete)"),
            ):
                button = Button(label, id=bid, compact=True, classes="stage-button")
                button.tooltip = tip
                button.can_focus = False  # Tab goes through the fields; the keys are ctrl+up/down/delete
                yield button
        if self.custom is not None:
            yield self.custom
        yield self.generic
        problem = Static("", classes="stage-problem", markup=False)
        problem.display = False
        yield problem

    def on_mount(self) -> None:
        if self.focus_when_mounted:
            self.call_after_refresh(self.focus_first)

    def focus_first(self) -> None:
        """Put the cursor in the stage's first field (keyboard use: Tab on from there)."""
        for widget in self.query("Input, Select, Checkbox"):
            if widget.focusable:
                widget.focus()
                break
        self.scroll_visible()

    @on(Button.Pressed, ".stage-button")
    def _button(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "stage-remove":
            self.post_message(self.Remove(self))
        else:
            self.post_message(self.Move(self, -1 if event.button.id == "stage-up" else 1))

    # -- state the form asks for ---------------------------------------------------------------
    @property
    def wants_grid(self) -> bool:
        return bool(getattr(self.custom, "wants_grid", False))

    def set_index(self, index: int) -> None:
        self.index = index
        self.border_title = f"{index} {self.kind}" + (f" · {self.stage_name}" if self.stage_name else "")

    def data(self, **ctx) -> dict:
        """The stage as recipe data (`[[stages]]` table); RecipeError when a field is not a value."""
        out: dict = {"kind": self.kind, **({"name": self.stage_name} if self.stage_name else {})}
        out.update(self.generic.data())
        if self.custom is not None:
            out.update(self.custom.values(**ctx))
        return out

    def problem(self, kinds_before: list[str], **ctx) -> str | None:
        """What stops this stage from running, where no field already says it: order, or a mix of fields."""
        try:
            self.stype.check_order(kinds_before)
        except RecipeError as exc:
            return str(exc)
        if self.generic.problems() or (self.custom is not None and self._custom_problems()):
            return None  # the field says it
        try:
            raw = self.data(**ctx)
            raw.pop("kind")
            raw.pop("name", None)
            from_dict(self.stype.Config, raw, self.kind)
        except RecipeError as exc:
            return strip_where(str(exc), self.kind)
        return None

    def _custom_problems(self) -> list[str]:
        return [p for p in (fe.problem() for fe in self.custom.query(FieldEditor) if fe.display) if p]

    def sync(self, kinds_before: list[str], **ctx) -> None:
        """Refresh texts, greyed-out fields and the problem line."""
        if self.custom is not None:
            self.custom.sync(self.generic.fields, **ctx)
        if not self.is_mounted:
            return
        text = self.problem(kinds_before, **ctx)
        line = self.query_one(".stage-problem", Static)
        line.update(text or "")
        line.display = bool(text)
        self.set_class(bool(text), "refused")
