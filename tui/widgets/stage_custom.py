"""The two stage settings a plain input edits badly: a layer plan and an N:M pattern.

A custom editor names the config fields it owns (`FIELDS`, matched against a stage kind's
`FORM_CUSTOM`, so any kind with the same fields gets it), the data a new stage starts from
(`START`), and gives those fields back as plain data with `values(grid_plan=..., linked=...)`.
`sync(fields, ...)` lets it update its texts and grey out generic fields that stop meaning
anything (k and metric once a plan is given). A kind whose custom fields no editor owns keeps
them as loaded.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Select, Static

from frankenlab.evals.config import FieldInfo, config_fields, from_dict
from frankenlab.evals.errors import RecipeError
from frankenlab.tui.widgets.form_fields import FieldEditor, strip_where

# The thesis' width ratios (thesis notation: N:M prunes N of every M).
THESIS_RATIOS = ("1:2", "2:4", "3:4", "1:8", "4:8", "6:8", "1:16", "8:16", "12:16")


def nm_text(pattern: str) -> str:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern or "")
    if not m:
        return "N:M prunes N of every M consecutive weights"
    n, mm = int(m.group(1)), int(m.group(2))
    if mm == 0 or n >= mm:
        return f"{n}:{mm} is not valid: N must be smaller than M"
    return f"prunes {n} of every {mm} weights ({n / mm:.1%} removed)"


def _check(cls: type, data: dict, where: str) -> None:
    try:
        from_dict(cls, data, where)
    except RecipeError as exc:
        raise RecipeError(strip_where(str(exc), where)) from None


class NMPicker(Vertical):
    """Width pruning's pattern: a thesis ratio, a custom N:M, an unstructured ratio, or none (only the
    layers the per-layer map names are pruned; the map itself is the generic `patterns` field)."""

    FIELDS = frozenset({"pattern", "n", "m", "ratio"})
    START = {"pattern": "1:8"}

    def __init__(self, cls: type, config: Any, *, prefix: str):
        super().__init__(classes="custom nm-picker")
        self.cls, self.prefix = cls, prefix
        self.infos = {f.name: f for f in config_fields(cls)}
        unstructured = config is not None and getattr(config, "ratio", None) is not None
        pattern = f"{config.n}:{config.m}" if config is not None and not unstructured and config.n else "1:8"
        self.choice = "unstructured" if unstructured else pattern if pattern in THESIS_RATIOS else "custom"
        if config is not None and not unstructured and not config.n and getattr(config, "patterns", None):
            self.choice = "none"  # only the per-layer map's layers
        self._select: Select | None = None
        custom = FieldInfo(
            "custom",
            "custom N:M",
            "thesis notation: N:M prunes N of every M consecutive weights of each row",
            str,
            str,
            False,
            "1:8",
        )
        self.custom = FieldEditor(custom, pattern, lambda v: _check(cls, {"pattern": v}, prefix), prefix=prefix)
        ratio = replace(self.infos["ratio"], label="ratio", optional=False)
        self.unstructured = FieldEditor(
            ratio,
            config.ratio if unstructured else 0.5,
            lambda v: _check(cls, {"ratio": v}, prefix),
            prefix=prefix,
            input_id=f"{prefix}-unstructured",
        )

    def compose(self) -> ComposeResult:
        with Horizontal(classes="field-row"):
            yield Label(self.infos["pattern"].label, classes="field-label")
            options = [(f"{r}  ({nm_text(r).split(' (')[0]})", r) for r in THESIS_RATIOS]
            options += [("custom N:M", "custom"), ("unstructured ratio", "unstructured")]
            options += [("none: only the layers the per-layer map names", "none")]
            self._select = Select(
                options, value=self.choice, allow_blank=False, compact=True, id=f"{self.prefix}-ratio"
            )
            self._select.tooltip = self.infos["pattern"].help
            yield self._select
        yield self.custom
        yield self.unstructured
        yield Static("", id=f"{self.prefix}-says", classes="hint says", markup=False)

    @property
    def current(self) -> str:
        if self._select is not None and self._select.is_mounted:
            return str(self._select.value)
        return self.choice

    @on(Select.Changed)
    def _picked(self, event: Select.Changed) -> None:
        if event.select is self._select:
            self.choice = str(event.value)

    def values(self, **_ctx) -> dict:
        choice = self.current
        if choice == "unstructured":
            return {"pattern": None, "n": None, "m": None, "ratio": self.unstructured.value}
        if choice == "none":
            return {"pattern": None, "n": None, "m": None, "ratio": None}
        pattern = self.custom.value if choice == "custom" else choice
        return {"pattern": pattern, "n": None, "m": None, "ratio": None}

    def set_pattern(self, pattern: str | None) -> None:
        """Show `pattern` ("2:4"), or "none" (None): only the per-layer map's layers are pruned."""
        if pattern is None or pattern == "none":
            self.choice = "none"
        else:
            self.choice = pattern if pattern in THESIS_RATIOS else "custom"
            self.custom.set_value(pattern)
        if self._select is not None and self._select.is_mounted:
            self._select.value = self.choice

    def sync(self, fields: dict, **_ctx) -> None:
        if not self.is_mounted:
            return
        choice = self.current
        self.custom.display = choice == "custom"
        self.unstructured.display = choice == "unstructured"
        if choice == "unstructured":
            try:
                says = f"prunes {float(self.unstructured.value):.1%} of each row's weights (unstructured)"
            except (RecipeError, TypeError, ValueError):
                says = "the fraction of each row's weights pruned, between 0 and 1"
        elif choice == "none":
            says = "only the layers 'per layer' names are pruned; the others stay dense"
        else:
            try:
                says = nm_text(self.custom.value if choice == "custom" else choice)
            except RecipeError:
                says = nm_text("")
        self.query_one(f"#{self.prefix}-says", Static).update(says)

    def on_mount(self) -> None:
        self.sync({})


class PlanPicker(Vertical):
    """Depth pruning's choice: rank layers by importance (k, metric), or apply a layer plan.

    Only the first stage in plan mode follows the layer grid; another keeps the plan its recipe gave."""

    FIELDS = frozenset({"plan", "layers"})
    START: dict = {}
    RANK_FIELDS = ("k", "metric")  # meaningless once a plan is given: shown disabled

    def __init__(self, cls: type, config: Any, *, prefix: str):
        super().__init__(classes="custom plan-picker")
        self.prefix = prefix
        self.recipe_plan = getattr(config, "plan", None)  # the recipe's own plan / explicit layers
        self.recipe_layers = getattr(config, "layers", None)
        self.mode = "plan" if self.recipe_plan is not None or self.recipe_layers is not None else "rank"
        self._select: Select | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(classes="field-row"):
            yield Label("layers", classes="field-label")
            self._select = Select(
                [("rank by importance (k, metric)", "rank"), ("the layer grid's plan", "plan")],
                value=self.mode,
                allow_blank=False,
                compact=True,
                id=f"{self.prefix}-mode",
            )
            self._select.tooltip = (
                "rank: remove the k least important layers; plan: skip and repeat layers "
                "as the grid in 1 Layers shows (u there makes this stage use it)"
            )
            yield self._select
        yield Static("", id=f"{self.prefix}-plan-text", classes="hint says", markup=False)

    @property
    def wants_grid(self) -> bool:
        if self._select is not None and self._select.is_mounted:
            return self._select.value == "plan"
        return self.mode == "plan"

    @on(Select.Changed)
    def _picked(self, event: Select.Changed) -> None:
        if event.select is self._select:
            self.mode = str(event.value)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if self._select is not None and self._select.is_mounted:
            self._select.value = mode

    def follow_grid(self, grid_plan: str | None) -> None:
        """The grid now gives the plan: explicit layers from the recipe give way to it."""
        if grid_plan:
            self.recipe_layers = None

    def values(self, *, grid_plan: str | None = None, linked: bool = False, **_ctx) -> dict:
        if not self.wants_grid:
            return {"plan": None, "layers": None}
        if linked and grid_plan:
            return {"plan": grid_plan, "layers": None}
        if self.recipe_plan is not None and not linked:
            return {"plan": self.recipe_plan, "layers": None}
        if self.recipe_layers is not None:
            return {"plan": None, "layers": list(self.recipe_layers)}
        if linked:
            raise RecipeError("the layer grid keeps every layer: skip or repeat some in 1 Layers, or rank by k")
        raise RecipeError(
            "only the first depth stage in plan mode follows the layer grid, and this one has no "
            "plan of its own: rank by k instead"
        )

    def sync(self, fields: dict, *, grid_plan: str | None = None, linked: bool = False, **_ctx) -> None:
        by_plan = self.wants_grid
        for name in self.RANK_FIELDS:
            if name in fields:
                fields[name].disabled = by_plan
        if not self.is_mounted:
            return
        text = ""
        if by_plan:
            try:
                v = self.values(grid_plan=grid_plan, linked=linked)
                text = (
                    f"plan: {v['plan']}" + (" (the layer grid's)" if linked else " (the recipe's)")
                    if v["plan"]
                    else f"removes layers {v['layers']} (the recipe's)"
                )
            except RecipeError as exc:
                text = str(exc)
        shown = self.query_one(f"#{self.prefix}-plan-text", Static)
        shown.update(text)
        shown.display = bool(text)


CUSTOM_EDITORS = (PlanPicker, NMPicker)


def custom_editor_for(form_custom: frozenset[str]):
    """The custom editor owning a kind's custom fields, or None (they are then kept as loaded)."""
    return next((c for c in CUSTOM_EDITORS if c.FIELDS and c.FIELDS <= form_custom), None)
