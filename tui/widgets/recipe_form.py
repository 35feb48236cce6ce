"""The recipe builder: the stages in the order they run, then the evaluation and calibration settings.

The form edits a `Recipe` value. Its stages are a list of editors, one per `StageSpec`: add a
stage of any registered kind (a kind whose optional package is missing is listed with the reason,
never faked), move it up or down, remove it; a kind may repeat (order is data). Each editor is
built from its kind's config metadata (`stage_editor.py`), the evaluation and calibration
sections from `EvalConfig` and `CalibrationConfig` the same way (`form_fields.py`).

`build()` turns the form into recipe data and hands it to `Recipe.from_dict`, the loader
`frankenlab run` uses, so the form accepts exactly what the runner accepts and refuses with the
same words. `load(recipe)` fills the form, keeping every field it does not show.
The app talks to it through attributes and a few calls (attributes down, messages up):
`grid_plan` / `set_grid_plan()`, `use_grid_plan()`, `set_width()`, `set_stage_fields()`, `protected`, `model_source`,
`build()`, `load()`, and the `Changed` message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from frankenlab.evals.config import FieldInfo, to_dict
from frankenlab.evals.errors import RecipeError
from frankenlab.evals.suite import EvalConfig
from frankenlab.pipeline.calibration import CalibrationConfig
from frankenlab.pipeline.recipe import ModelSpec, Recipe
from frankenlab.pipeline.stages import stage_kind, stage_names
from frankenlab.tui.widgets.form_fields import ConfigEditor, FieldEditor
from frankenlab.tui.widgets.stage_editor import StageEditor

NAME = FieldInfo("name", "name", "the recipe's name; a run is saved as runs/<name>-<time>", str, str, False, "lab")


MOVE = Binding.Group("Move", compact=True)


def _check_name(value: Any) -> None:
    if not str(value).strip():
        raise RecipeError("give the recipe a name")


class RecipeForm(VerticalScroll):
    """Builds a Recipe from the form; posts `Changed` whenever a field or the stage list changes."""

    BINDINGS = [
        Binding("ctrl+n", "add_stage", "Add stage"),
        Binding("ctrl+up,alt+up", "move_stage(-1)", "Move stage up", group=MOVE),
        Binding("ctrl+down,alt+down", "move_stage(1)", "Move stage down", group=MOVE),
        Binding("ctrl+delete,alt+delete", "remove_stage", "Remove", tooltip="Remove the stage the cursor is in"),
    ]

    class Changed(Message):
        pass

    def __init__(self, *, id: str | None = None):
        super().__init__(id=id)
        self.grid_plan: str | None = None  # set by the app from the layer grid (attributes down)
        self.model_source = "default"  # the lab's model: a built recipe names it
        self.base_model = ModelSpec()  # the loaded recipe's dtype/device/trust settings
        self.description = "built in the lab"
        self.editors: list[StageEditor] = []  # the stages in order; the DOM follows this list
        self._uid = 0
        self.kinds, self.unavailable = self._read_kinds()
        self.name_field = FieldEditor(NAME, "lab", _check_name, prefix="recipe")
        self.evaluation = ConfigEditor(
            EvalConfig, EvalConfig(), prefix="eval", where="evaluation", id="sec-eval", classes="section"
        )
        self.calibration = ConfigEditor(
            CalibrationConfig, CalibrationConfig(), prefix="cal", where="calibration", id="sec-calib", classes="section"
        )

    @staticmethod
    def _read_kinds() -> tuple[dict[str, str], dict[str, str]]:
        """Registered kinds: {kind: description} that load here, {kind: reason} for those that do not."""
        kinds, unavailable = {}, {}
        for name in stage_names():
            stype = stage_kind(name)
            try:
                stype.load()
                kinds[name] = stype.description
            except RecipeError as exc:
                unavailable[name] = str(exc).split(". Re-run")[0]
        return kinds, unavailable

    # -- layout -------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield self.name_field
        yield Static(
            "no stages: a run only evaluates the model as it is. Add one below (ctrl+n)",
            id="stages-empty",
            classes="hint",
        )
        yield Vertical(*self.editors, id="stages")
        with Horizontal(id="add-row", classes="field-row"):
            yield Label("add a stage", classes="field-label")
            options = [
                (f"{k}: {self.kinds[k]}" if k in self.kinds else f"{k}: not available", k)
                for k in stage_names()
                if k in self.kinds or k in self.unavailable
            ]
            yield Select(
                options,
                value=options[0][1] if options else Select.NULL,
                allow_blank=not options,
                compact=True,
                id="add-kind",
            )
            yield Button("add", id="add-stage", compact=True)
        yield Static("", id="add-hint", classes="hint", markup=False)
        self.evaluation.border_title = "Evaluation"
        yield self.evaluation
        self.calibration.border_title = "Calibration"
        yield self.calibration

    def on_mount(self) -> None:
        self._refresh()
        self._show_add_hint()

    def _box(self) -> Widget | None:
        boxes = self.query("#stages")
        return boxes.first() if boxes else None

    # -- reacting -----------------------------------------------------------------------------
    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _changed(self, event) -> None:
        if event.control.id == "add-kind":
            self._show_add_hint()
            return
        self._refresh()
        self.post_message(self.Changed())

    def _show_add_hint(self) -> None:
        picker = self.query_one("#add-kind", Select)
        kind = None if picker.is_blank() else str(picker.value)
        hint = self.query_one("#add-hint", Static)
        if kind in self.unavailable:
            hint.update(self.unavailable[kind])
        else:
            hint.update(self.kinds.get(kind, "") if kind else "")
        hint.set_class(kind in self.unavailable, "unavailable-kind")

    def _contexts(self) -> Iterator[tuple[int, StageEditor, list[str], dict]]:
        """Each stage with its number, the kinds before it, and what its custom editor needs to know:
        the first stage that asks for a layer plan follows the layer grid."""
        linked_taken = False
        for i, ed in enumerate(self.editors):
            linked = ed.wants_grid and not linked_taken
            linked_taken |= linked
            yield i + 1, ed, [e.kind for e in self.editors[:i]], {"grid_plan": self.grid_plan, "linked": linked}

    def _refresh(self) -> None:
        for number, ed, before, ctx in self._contexts():
            ed.set_index(number)
            ed.sync(before, **ctx)
        empty = self.query("#stages-empty")
        if empty:
            empty.first().display = not self.editors

    def _structure_changed(self) -> None:
        self._refresh()
        self.post_message(self.Changed())

    @on(Button.Pressed, "#add-stage")
    def _add_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        picker = self.query_one("#add-kind", Select)
        if picker.is_blank():
            return
        try:
            editor = self.add_stage(str(picker.value))
        except RecipeError as exc:
            self.notify(str(exc), title="stage not added", severity="error")
            return
        editor.focus_when_mounted = True

    @on(StageEditor.Move)
    def _move_message(self, message: StageEditor.Move) -> None:
        self.move_stage(message.editor, message.delta)

    @on(StageEditor.Remove)
    def _remove_message(self, message: StageEditor.Remove) -> None:
        self.remove_stage(message.editor)

    # -- the stage list ------------------------------------------------------------------------
    def add_stage(
        self, kind: str, config: Any = None, *, index: int | None = None, stage_name: str = ""
    ) -> StageEditor:
        """Insert a stage of `kind` (at the end by default); RecipeError when the kind cannot run here."""
        if kind in self.unavailable:
            raise RecipeError(self.unavailable[kind])
        stage_kind(kind).load()
        self._uid += 1
        editor = StageEditor(kind, config, stage_name, uid=self._uid)
        index = len(self.editors) if index is None else max(0, min(index, len(self.editors)))
        self.editors.insert(index, editor)
        box = self._box()
        if box is not None:
            nxt = self.editors[index + 1] if index + 1 < len(self.editors) else None
            box.mount(editor, before=nxt) if nxt is not None and nxt.parent is box else box.mount(editor)
        self._structure_changed()
        return editor

    def remove_stage(self, editor: StageEditor) -> None:
        if editor in self.editors:
            self.editors.remove(editor)
        if editor.parent is not None:
            editor.remove()
        self._structure_changed()

    def move_stage(self, editor: StageEditor, delta: int) -> bool:
        """Move a stage `delta` places (negative = earlier); False when it is already at that end."""
        i = self.editors.index(editor)
        j = i + delta
        if delta == 0 or not 0 <= j < len(self.editors):
            return False
        self.editors.pop(i)
        self.editors.insert(j, editor)
        box = self._box()
        if box is not None and editor.parent is box:
            if j < i:
                box.move_child(editor, before=self.editors[j + 1])
            else:
                box.move_child(editor, after=self.editors[j - 1])
        self._structure_changed()
        return True

    def _natural_index(self, kind: str) -> int:
        """Where a stage the app adds goes: before the first stage of a kind registered after it."""
        order = stage_names()
        rank = order.index(kind) if kind in order else len(order)
        for i, ed in enumerate(self.editors):
            if (order.index(ed.kind) if ed.kind in order else len(order)) > rank:
                return i
        return len(self.editors)

    # -- keyboard ------------------------------------------------------------------------------
    def _focused_editor(self) -> StageEditor | None:
        node = self.screen.focused if self.is_mounted else None
        while node is not None and node is not self:
            if isinstance(node, StageEditor):
                return node
            node = node.parent
        return None

    def _focus_editor(self, editor: StageEditor) -> None:
        editor.focus_first()

    def action_add_stage(self) -> None:
        picker = self.query_one("#add-kind", Select)
        picker.focus()
        picker.scroll_visible()

    def action_move_stage(self, delta: int) -> None:
        editor = self._focused_editor()
        if editor is None:
            self.notify("put the cursor in a stage to move it", severity="warning")
        elif self.move_stage(editor, delta):
            self.call_after_refresh(editor.scroll_visible)

    def action_remove_stage(self) -> None:
        editor = self._focused_editor()
        if editor is None:
            self.notify("put the cursor in a stage to remove it", severity="warning")
            return
        i = self.editors.index(editor)
        self.remove_stage(editor)
        if self.editors:
            self.call_after_refresh(self._focus_editor, self.editors[min(i, len(self.editors) - 1)])
        else:
            self.call_after_refresh(self.action_add_stage)

    # -- what the app calls --------------------------------------------------------------------
    def set_grid_plan(self, plan_text: str | None) -> None:
        self.grid_plan = plan_text
        for _, ed, _, ctx in self._contexts():
            if ctx["linked"]:
                ed.custom.follow_grid(plan_text)
        if self.is_mounted:
            self._refresh()

    def _first(self, kind: str) -> StageEditor | None:
        return next((e for e in self.editors if e.kind == kind), None)

    def use_grid_plan(self) -> None:
        """Make the (first) depth stage apply the grid's plan, adding one if the recipe has none."""
        editor = self._first("depth") or self.add_stage("depth", index=self._natural_index("depth"))
        editor.custom.set_mode("plan")
        self._structure_changed()

    def set_width(self, pattern: str) -> None:
        """Set the (first) width stage's N:M pattern, adding a width stage if the recipe has none."""
        editor = self._first("width") or self.add_stage("width", index=self._natural_index("width"))
        editor.custom.set_pattern(pattern)
        self._structure_changed()

    def set_stage_fields(self, kind: str, values: dict) -> StageEditor:
        """Set fields of the (first) `kind` stage, adding one if the recipe has none: a planner's plan
        fills `width.patterns` ({"0-3": "none", ...}) and `gptq.layer_bits` this way. Values are plain
        data; a width stage's `pattern` (None = only the map's layers) goes to its N:M picker."""
        editor = self._first(kind) or self.add_stage(kind, index=self._natural_index(kind))
        for name, value in values.items():
            if name == "pattern" and editor.custom is not None and hasattr(editor.custom, "set_pattern"):
                editor.custom.set_pattern(value)
            elif name in editor.generic.fields:
                editor.generic.fields[name].set_value(value)
            else:
                raise RecipeError(f"the form shows no field {name!r} for a {kind} stage")
        self._structure_changed()
        return editor

    @property
    def protected(self) -> tuple[int, int]:
        """(first, last) layers the depth stage protects: the grid underlines them."""
        editor = self._first("depth")
        try:
            fields = editor.generic.fields
            return int(fields["protected_first"].value), int(fields["protected_last"].value)
        except (AttributeError, KeyError, RecipeError, TypeError, ValueError):
            return (4, 2)

    # -- recipe <-> form ----------------------------------------------------------------------
    def recipe_data(self) -> dict:
        """The form as recipe data (what a TOML file holds); RecipeError when a field is not a value."""
        stages = []
        for number, ed, _, ctx in self._contexts():
            try:
                stages.append(ed.data(**ctx))
            except RecipeError as exc:
                raise RecipeError(f"stage {number} ({ed.kind}): {exc}") from None
        sections = {}
        for key, section in (("calibration", self.calibration), ("evaluation", self.evaluation)):
            try:
                sections[key] = section.data()
            except RecipeError as exc:
                raise RecipeError(f"{key}: {exc}") from None
        name = str(self.name_field.value).strip() or "lab"
        return {
            "name": name,
            "description": self.description,
            "model": {**to_dict(self.base_model), "source": self.model_source},
            **sections,
            "stages": stages,
        }

    def build(self) -> Recipe:
        """The recipe the form describes, validated as `frankenlab run` validates a file."""
        return Recipe.from_dict(self.recipe_data())

    def load(self, recipe: Recipe) -> list[str]:
        """Fill the form from `recipe`; returns notes about what the form could not show."""
        notes = []
        self.name_field.set_value(recipe.name)
        self.description, self.base_model = recipe.description, recipe.model
        self.evaluation.load(recipe.evaluation)
        self.calibration.load(recipe.calibration)
        for editor in self.editors:
            if editor.parent is not None:
                editor.remove()
        self.editors = []
        for spec in recipe.stages:
            if spec.kind in self.unavailable:
                notes.append(f"{self.unavailable[spec.kind]}; the form leaves that stage out")
                continue
            self._uid += 1
            self.editors.append(StageEditor(spec.kind, spec.config, spec.name, uid=self._uid))
        box = self._box()
        if box is not None and self.editors:
            box.mount_all(self.editors)
        linked = next((ed for _, ed, _, ctx in self._contexts() if ctx["linked"]), None)
        if linked is not None and linked.kind == "depth":
            self.grid_plan = linked.custom.recipe_plan  # the app also pushes it into the grid
            if linked.custom.recipe_layers is not None:
                notes.append("depth: explicit layers are shown as a plan in the grid")
        self._structure_changed()
        return notes
