"""The recipe builder: depth, width N:M, LoRA, GPTQ, EoRA and evaluation settings as a form.

Every field is validated as it is typed, by the same config dataclasses the runner uses, so the
reason shown under a field is the one `frankenlab run` would print. Stages whose module is not
installed (or not written yet) are shown as unavailable with the reason, never faked.
`build()` returns a `Recipe`; `load(recipe)` fills the form from one.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import replace
from typing import Any, Callable

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.validation import ValidationResult, Validator
from textual.widgets import Checkbox, Input, Label, Select, Static

from evals.suite import EvalConfig
from pipeline.calibration import CalibrationConfig
from pipeline.config import RecipeError, from_dict
from pipeline.recipe import ModelSpec, Recipe, StageSpec
from pipeline.stages import stage_kind

# The thesis' width ratios (N:M prunes N of every M).
THESIS_RATIOS = ("1:2", "2:4", "3:4", "1:8", "4:8", "6:8", "1:16", "8:16", "12:16")
DEPTH_METRICS = ("perplexity", "l1", "taylor")
STAGE_FIELDS = {  # curated fields per optional stage: (form label, candidate config field names)
    "lora": [("data", ("data", "dataset")), ("steps", ("steps", "max_steps")), ("samples", ("samples",)),
             ("rank", ("rank", "r"))],
    "gptq": [("bits", ("bits",)), ("group size", ("group_size",))],
    "eora": [("rank", ("rank", "r"))],
}


class FnValidator(Validator):
    """Runs `check(value)`; a RecipeError/ValueError message becomes the field's failure reason."""

    def __init__(self, check: Callable[[str], Any]):
        super().__init__()
        self.check = check

    def validate(self, value: str) -> ValidationResult:
        try:
            self.check(value)
        except (RecipeError, ValueError, TypeError) as exc:
            return self.failure(str(exc))
        return self.success()


def _int(value: str, name: str, lo: int = 0) -> int:
    try:
        v = int(value.strip())
    except ValueError:
        raise ValueError(f"{name}: expected a whole number, got {value!r}") from None
    if v < lo:
        raise ValueError(f"{name} must be at least {lo}")
    return v


def _typed(value: str, tp: Any) -> Any:
    text = value.strip()
    if tp is int:
        return int(text) if text else None
    if tp is float:
        return float(text) if text else None
    if tp is bool:
        return text.lower() in ("1", "true", "yes", "on")
    return text  # text, or a comma list that from_dict splits


def nm_text(pattern: str) -> str:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern or "")
    if not m:
        return "N:M prunes N of every M consecutive weights"
    n, mm = int(m.group(1)), int(m.group(2))
    if mm == 0 or n >= mm:
        return f"{n}:{mm} is not valid: N must be smaller than M"
    return f"prunes {n} of every {mm} weights ({n / mm:.1%} removed)"


class Field(Vertical):
    """A label, an input and the reason the value is refused (empty while it is valid)."""

    def __init__(self, label: str, value: str, check: Callable[[str], Any], *, id: str,
                 placeholder: str = "", tooltip: str | None = None):
        super().__init__(classes="field", id=f"{id}-field")
        self._label, self._value, self._check, self._input_id = label, value, check, id
        self._placeholder, self._tip = placeholder, tooltip

    def compose(self) -> ComposeResult:
        with Horizontal(classes="field-row"):
            yield Label(self._label, classes="field-label")
            inp = Input(self._value, placeholder=self._placeholder, id=self._input_id,
                        validators=[FnValidator(self._check)], validate_on=["changed", "submitted"],
                        compact=True)
            if self._tip:
                inp.tooltip = self._tip
            yield inp
        err = Static("", classes="field-error")
        err.display = False
        yield err

    @on(Input.Changed)
    def _show_reason(self, event: Input.Changed) -> None:
        err = self.query_one(".field-error", Static)
        if event.validation_result and not event.validation_result.is_valid:
            err.update(" ".join(event.validation_result.failure_descriptions))
            err.display = True
            self.add_class("invalid")
        else:
            err.update("")
            err.display = False
            self.remove_class("invalid")


class RecipeForm(VerticalScroll):
    """Builds a Recipe from the form; posts `Changed` whenever a field changes."""

    class Changed(Message):
        pass

    def __init__(self, *, id: str | None = None):
        super().__init__(id=id)
        self.grid_plan: str | None = None  # set by the app from the layer grid (attributes down)
        self.base_evaluation = EvalConfig()  # fields the form does not show come from the loaded recipe
        self.base_calibration = CalibrationConfig()
        self.base_stages: dict[str, Any] = {}  # kind -> the loaded recipe's config: fields the form hides
        self.model_source = "default"
        self.available: dict[str, Any] = {}
        self.unavailable: dict[str, str] = {}
        for kind in ("lora", "gptq", "eora"):
            try:
                self.available[kind] = stage_kind(kind).load()
            except RecipeError as exc:
                self.unavailable[kind] = str(exc).split(". Re-run")[0]

    # -- layout -------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Field("name", "lab", lambda v: v.strip() or (_ for _ in ()).throw(ValueError("give the recipe a name")),
                    id="recipe-name")
        with Vertical(classes="section", id="sec-depth") as sec:
            sec.border_title = "Depth pruning"
            yield Checkbox("remove decoder layers", False, id="depth-on", compact=True)
            yield Select([("rank by importance (k, metric)", "rank"), ("use the layer grid's plan", "plan")],
                         value="rank", allow_blank=False, compact=True, id="depth-mode")
            yield Field("k", "2", lambda v: _int(v, "k (layers to remove)"), id="depth-k")
            with Horizontal(classes="field-row"):
                yield Label("metric", classes="field-label")
                yield Select([(m, m) for m in DEPTH_METRICS], value="perplexity", allow_blank=False, compact=True,
                             id="depth-metric")
            yield Field("protect first", "4", lambda v: _int(v, "protected_first"), id="depth-pfirst")
            yield Field("protect last", "2", lambda v: _int(v, "protected_last"), id="depth-plast")
            yield Static("", id="depth-plan-text", classes="hint")
        with Vertical(classes="section", id="sec-width") as sec:
            sec.border_title = "Width pruning (N:M prunes N of every M)"
            yield Checkbox("WANDA N:M width pruning", False, id="width-on", compact=True)
            yield Select([(f"{r}  ({nm_text(r).split(' (')[0]})", r) for r in THESIS_RATIOS] + [("custom", "custom")],
                         value="1:8", allow_blank=False, compact=True, id="width-ratio")
            yield Field("custom N:M", "1:8", self._check_pattern, id="width-custom",
                        tooltip="thesis notation: N:M prunes N of every M consecutive weights")
            yield Static(nm_text("1:8"), id="width-says", classes="hint")
            with Horizontal(classes="field-row"):
                yield Label("method", classes="field-label")
                yield Select([("wanda", "wanda"), ("magnitude", "magnitude")], value="wanda", allow_blank=False, compact=True,
                             id="width-method")
            with Horizontal(classes="field-row"):
                yield Label("statistics", classes="field-label")
                yield Select([("per projection (1 pass)", "projection"), ("per layer (reference)", "layer")],
                             value="projection", allow_blank=False, compact=True, id="width-sequential",
                             tooltip="projection: each projection scored on the inputs it receives after the ones "
                                     "before it are pruned; layer: the WANDA reference code (two passes per layer)")
        for kind, title in (("lora", "LoRA recovery"), ("gptq", "GPTQ quantization"), ("eora", "EoRA compensation")):
            with Vertical(classes="section", id=f"sec-{kind}") as sec:
                sec.border_title = title
                if kind not in self.available:
                    yield Static(f"not available: {self.unavailable.get(kind, '')}", classes="hint unavailable")
                    continue
                yield Checkbox(title, False, id=f"{kind}-on", compact=True)
                cfg = self.available[kind].Config()
                for label, names in STAGE_FIELDS[kind]:
                    fname = next((n for n in names if hasattr(cfg, n)), None)
                    if fname is None:
                        continue
                    value = getattr(cfg, fname)
                    yield Field(label, "" if value is None else str(value), self._stage_check(kind, fname),
                                id=f"{kind}-{fname.replace('_', '-')}")
        with Vertical(classes="section", id="sec-eval") as sec:
            sec.border_title = "Evaluation"
            ev = EvalConfig()
            yield Field("perplexity", ", ".join(ev.perplexity), self._check_protocols, id="eval-ppl",
                        tooltip="protocols, comma separated: <data>-rows-<len> (thesis) or <data>-concat-<len>")
            yield Field("ppl limit", str(ev.ppl_limit or 0), lambda v: _int(v, "ppl limit (0 = all)"), id="eval-limit")
            yield Field("TriviaQA closed", "0", lambda v: _int(v, "TriviaQA closed-book questions"), id="eval-tqa-closed")
            yield Field("TriviaQA open", "0", lambda v: _int(v, "open-book questions"), id="eval-tqa-open")
            with Horizontal(classes="field-row"):
                yield Label("evaluate", classes="field-label")
                yield Select([("after each stage", "each"), ("after the last", "last"), ("never", "none")],
                             value="each", allow_blank=False, compact=True, id="eval-after")
        with Vertical(classes="section", id="sec-calib") as sec:
            sec.border_title = "Calibration"
            cal = CalibrationConfig()
            yield Field("dataset", cal.dataset, lambda v: v.strip() or (_ for _ in ()).throw(ValueError("name a dataset")),
                        id="cal-dataset")
            yield Field("samples", str(cal.samples), lambda v: _int(v, "calibration samples", 1), id="cal-samples")
            yield Field("seq len", str(cal.seq_len), lambda v: _int(v, "seq len", 8), id="cal-seqlen")

    # -- field checks -------------------------------------------------------------------------
    @staticmethod
    def _check_pattern(value: str) -> None:
        width = stage_kind("width").load()
        width.Config(pattern=value)

    @staticmethod
    def _check_protocols(value: str) -> None:
        items = tuple(p.strip() for p in value.split(",") if p.strip())
        EvalConfig(perplexity=items)

    def _stage_check(self, kind: str, fname: str) -> Callable[[str], None]:
        def check(value: str) -> None:
            module = self.available[kind]
            tp = {f.name: f.type for f in dataclasses.fields(module.Config)}[fname]
            try:
                typed = _typed(value, _resolve_type(module.Config, fname, tp))
            except ValueError:
                raise ValueError(f"{fname}: {value!r} is not a valid value") from None
            from_dict(module.Config, {fname: typed}, kind)
        return check

    # -- reacting -----------------------------------------------------------------------------
    def on_mount(self) -> None:
        self._sync()

    @on(Select.Changed)
    @on(Checkbox.Changed)
    @on(Input.Changed)
    def _changed(self, event) -> None:
        self._sync()
        self.post_message(self.Changed())

    def _sync(self) -> None:
        ratio = self.query_one("#width-ratio", Select).value
        custom = self.query_one("#width-custom-field")
        custom.display = ratio == "custom"
        pattern = self.query_one("#width-custom", Input).value if ratio == "custom" else str(ratio)
        self.query_one("#width-says", Static).update(nm_text(pattern))
        by_plan = self.query_one("#depth-mode", Select).value == "plan"
        for fid in ("#depth-k-field", "#depth-metric"):
            self.query_one(fid).disabled = by_plan
        text = ("plan: " + (self.grid_plan or "(the grid keeps every layer)")) if by_plan else ""
        plan_text = self.query_one("#depth-plan-text", Static)
        plan_text.update(text)
        plan_text.display = bool(text)

    def set_grid_plan(self, plan_text: str | None) -> None:
        self.grid_plan = plan_text
        if self.is_mounted:
            self._sync()

    def use_grid_plan(self) -> None:
        self.query_one("#depth-on", Checkbox).value = True
        self.query_one("#depth-mode", Select).value = "plan"
        self._sync()

    def set_width(self, pattern: str) -> None:
        self.query_one("#width-on", Checkbox).value = True
        if pattern in THESIS_RATIOS:
            self.query_one("#width-ratio", Select).value = pattern
        else:
            self.query_one("#width-ratio", Select).value = "custom"
            self.query_one("#width-custom", Input).value = pattern
        self._sync()

    @property
    def protected(self) -> tuple[int, int]:
        try:
            return (int(self.query_one("#depth-pfirst", Input).value),
                    int(self.query_one("#depth-plast", Input).value))
        except ValueError:
            return (4, 2)

    # -- recipe <-> form ----------------------------------------------------------------------
    def _val(self, wid: str) -> str:
        return self.query_one(f"#{wid}", Input).value

    def build(self) -> Recipe:
        """The recipe the form describes; RecipeError with the reason when a value is refused."""
        stages: list[StageSpec] = []
        if self.query_one("#depth-on", Checkbox).value:
            depth = stage_kind("depth").load()
            raw: dict[str, Any] = self._hidden_fields("depth")
            raw.update(protected_first=_int(self._val("depth-pfirst"), "protected_first"),
                       protected_last=_int(self._val("depth-plast"), "protected_last"))
            if self.query_one("#depth-mode", Select).value == "plan":
                if not self.grid_plan:
                    raise RecipeError("depth: the layer grid keeps every layer; skip or repeat some, or rank by k")
                raw["plan"] = self.grid_plan
            else:
                raw["k"] = _int(self._val("depth-k"), "k")
                raw["metric"] = self.query_one("#depth-metric", Select).value
            stages.append(StageSpec("depth", from_dict(depth.Config, raw, "depth")))
        if self.query_one("#width-on", Checkbox).value:
            width = stage_kind("width").load()
            ratio = self.query_one("#width-ratio", Select).value
            pattern = self._val("width-custom") if ratio == "custom" else ratio
            raw = self._hidden_fields("width")
            raw.pop("ratio", None)  # the form edits N:M patterns; an unstructured ratio was noted on load
            raw.update(pattern=pattern, method=self.query_one("#width-method", Select).value,
                       sequential=self.query_one("#width-sequential", Select).value)
            stages.append(StageSpec("width", from_dict(width.Config, raw, "width")))
        for kind, module in self.available.items():
            if not self.query_one(f"#{kind}-on", Checkbox).value:
                continue
            raw = self._hidden_fields(kind)
            for f in dataclasses.fields(module.Config):
                inputs = self.query(f"#{kind}-{f.name.replace('_', '-')}")
                if inputs:
                    raw[f.name] = _typed(inputs.first(Input).value, _resolve_type(module.Config, f.name, f.type))
            stages.append(StageSpec(kind, from_dict(module.Config, raw, kind)))
        try:
            evaluation = replace(
                self.base_evaluation, perplexity=tuple(p.strip() for p in self._val("eval-ppl").split(",") if p.strip()),
                ppl_limit=_int(self._val("eval-limit"), "ppl limit") or None,
                triviaqa_closed=_int(self._val("eval-tqa-closed"), "TriviaQA closed"),
                triviaqa_open=_int(self._val("eval-tqa-open"), "TriviaQA open"),
                after=str(self.query_one("#eval-after", Select).value))
            calibration = replace(self.base_calibration, dataset=self._val("cal-dataset").strip(),
                                  samples=_int(self._val("cal-samples"), "calibration samples", 1),
                                  seq_len=_int(self._val("cal-seqlen"), "seq len", 8))
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        name = self._val("recipe-name").strip() or "lab"
        return Recipe(name=name, description="built in the lab", model=ModelSpec(source=self.model_source),
                      calibration=calibration, evaluation=evaluation, stages=stages)

    def _hidden_fields(self, kind: str) -> dict:
        """Fields of the loaded recipe's `kind` stage that the form has no input for, as plain data."""
        base = self.base_stages.get(kind)
        if base is None:
            return {}
        shown = {"width": {"pattern", "n", "m", "method", "sequential"},
                 "depth": {"k", "metric", "plan", "layers"}}.get(kind, set())  # set by the form's controls
        out = {}
        for f in dataclasses.fields(base):
            if f.name in shown or self.query(f"#{kind}-{f.name.replace('_', '-')}"):
                continue
            value = getattr(base, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def load(self, recipe: Recipe) -> list[str]:
        """Fill the form from `recipe`; returns notes about what the form could not show."""
        notes = []
        self.base_stages = {}
        for spec in recipe.stages:
            self.base_stages.setdefault(spec.kind, spec.config)
        self.query_one("#recipe-name", Input).value = recipe.name
        for sw in self.query(Checkbox):
            sw.value = False
        seen = set()
        for spec in recipe.stages:
            if spec.kind in seen:
                notes.append(f"the form holds one {spec.kind} stage; a second one was dropped")
                continue
            seen.add(spec.kind)
            c = spec.config
            if spec.kind == "depth":
                self.query_one("#depth-on", Checkbox).value = True
                self.query_one("#depth-pfirst", Input).value = str(c.protected_first)
                self.query_one("#depth-plast", Input).value = str(c.protected_last)
                if c.plan is not None or c.layers is not None:
                    self.query_one("#depth-mode", Select).value = "plan"
                    self.grid_plan = c.plan  # the app also pushes it into the grid
                    if c.layers is not None:
                        notes.append("depth: explicit layers are shown as a plan in the grid")
                else:
                    self.query_one("#depth-mode", Select).value = "rank"
                    self.query_one("#depth-k", Input).value = str(c.k)
                    self.query_one("#depth-metric", Select).value = c.metric
            elif spec.kind == "width":
                if c.structured:
                    self.set_width(f"{c.n}:{c.m}")
                else:
                    notes.append(f"width: unstructured ratio {c.ratio} is not editable in the form")
                self.query_one("#width-method", Select).value = c.method
                self.query_one("#width-sequential", Select).value = c.sequential
            elif spec.kind in self.available:
                self.query_one(f"#{spec.kind}-on", Checkbox).value = True
                for f in dataclasses.fields(c):
                    inputs = self.query(f"#{spec.kind}-{f.name.replace('_', '-')}")
                    if inputs:
                        v = getattr(c, f.name)
                        inputs.first(Input).value = "" if v is None else str(v)
            else:
                notes.append(f"stage {spec.kind} is not available here")
        ev = recipe.evaluation
        self.base_evaluation, self.base_calibration = recipe.evaluation, recipe.calibration
        self.query_one("#eval-ppl", Input).value = ", ".join(ev.perplexity)
        self.query_one("#eval-limit", Input).value = str(ev.ppl_limit or 0)
        self.query_one("#eval-tqa-closed", Input).value = str(ev.triviaqa_closed)
        self.query_one("#eval-tqa-open", Input).value = str(ev.triviaqa_open)
        self.query_one("#eval-after", Select).value = ev.after
        cal = recipe.calibration
        self.query_one("#cal-dataset", Input).value = cal.dataset
        self.query_one("#cal-samples", Input).value = str(cal.samples)
        self.query_one("#cal-seqlen", Input).value = str(cal.seq_len)
        self._sync()
        return notes


def _resolve_type(cls, name: str, tp: Any) -> Any:
    import typing

    hints = typing.get_type_hints(cls)
    t = hints.get(name, tp)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args and typing.get_origin(t) is not tuple else t
