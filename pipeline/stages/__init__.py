"""The stage registry: what the rest of the house may ask about a stage kind.

A stage kind is one module (or any object) with
- `Config`: a frozen dataclass whose fields describe themselves (`evals.config.option`);
  `Config.check_for(n_layers)` (optional) validates it against the model's depth;
- `run(model, ctx, config) -> StageResult`;
and, where the default does not fit, small hooks the runner, the recipe, the session tables, the
migration of old sessions and the lab's form call instead of matching on kind names:

| hook | default | used by |
|---|---|---|
| `SUMMARY` (str) | the module docstring's first line | `frankenlab recipes`, the lab's stage picker |
| `needs_calibration(config) -> bool` | False | the runner's preflight (is the calibration text there?) |
| `preflight(config, evaluation, data_dir) -> warnings` | none | the runner's preflight, before any weights load: raise RecipeError to refuse the run (LoRA refuses training data that holds evaluated questions or rows; eora checks its own calibration text and `samples`); warnings go to the run's log |
| `check_config(config, model_config)` | accepts any model | the runner, before weights load: raise RecipeError when the model's config.json (a dict) cannot take the stage (N:M against the matrix widths; lora's and eora's `seq_len` against max_position_embeddings) |
| `layers_after(config, n_layers) -> int` | n_layers | recipe checks of the stages after it |
| `layer_plan(config, n_layers) -> LayerPlan or None` | None | the lab's layer grid shows a depth plan |
| `is_identity(config) -> bool` | False | sweeps: a stage that changes nothing (Depth k=0) is left out |
| `check_order(kinds_before)` | accepts any order | recipe loading (eora needs gptq before it) |
| `describe(params) -> str` | "Kind (k=v, ...)" | compare tables, the results pane |
| `ROLE` | "structure" | compare tables: "structure", "adapter" or "quant" column |
| `resume_problem(record) -> str or None` | None (a saved model folder resumes) | replay --from-stage |
| `migrate(params, version) -> params` | unchanged | loading sessions of older schema versions |
| `FORM_CUSTOM` (set of field names) | empty | the lab's form: fields a custom widget edits |
| `RUNS_IN_CHILD` (bool) | False | the runner: True runs the stage in a worker process (`pipeline.child_stage`) that reads its input model's saved folder and writes its own, for libraries that may exit or abort the process (gptq, eora) |

Modules are imported lazily so that reading a recipe never imports gptqmodel or peft. Other
packages can add kinds with the `frankenlab.stages` entry point group (name = kind,
value = module path), tests with `register(name, module)`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from frankenlab.evals.config import config_fields
from frankenlab.evals.errors import RecipeError

ROLES = ("structure", "adapter", "quant")


@dataclass
class StageType:
    """One registered stage kind: its module, loaded on first use, and its hooks with defaults."""

    name: str
    target: Any  # a module path ("frankenlab.pipeline.stages.depth") or the module/object itself
    summary: str = ""
    _module: Any = field(default=None, repr=False)

    def load(self):
        """The stage's module (imported on first use); RecipeError when it cannot be imported."""
        if self._module is None:
            if isinstance(self.target, str):
                try:
                    self._module = importlib.import_module(self.target)
                except ImportError as exc:
                    raise RecipeError(
                        f"stage {self.name!r} is not available: {exc}. Re-run the README's set-up "
                        "(it installs the optional packages this stage needs)"
                    ) from exc
            else:
                self._module = self.target
        return self._module

    def _hook(self, name: str):
        return getattr(self.load(), name, None)

    # -- what every stage has ---------------------------------------------------------------------
    @property
    def Config(self):  # noqa: N802 - the stage module's class, under its own name
        return self.load().Config

    def run(self, model, ctx, config):
        return self.load().run(model, ctx, config)

    def fields(self):
        """The config's fields with help text and form flags (`evals.config.FieldInfo`)."""
        return config_fields(self.Config)

    @property
    def description(self) -> str:
        if self.summary:
            return self.summary
        text = getattr(self.load(), "SUMMARY", None) or (self.load().__doc__ or "").strip().split("\n")[0]
        return text or self.name

    # -- hooks, with the defaults a plain stage needs ---------------------------------------------
    def needs_calibration(self, config) -> bool:
        hook = self._hook("needs_calibration")
        return bool(hook(config)) if hook else False

    def preflight(self, config, evaluation, data_dir) -> list[str]:
        """Checks of this stage against the whole recipe (its `EvalConfig`), before weights load:
        raises RecipeError to refuse the run, returns warnings for the log."""
        hook = self._hook("preflight")
        return list(hook(config, evaluation, data_dir) or []) if hook else []

    def layers_after(self, config, n_layers: int) -> int:
        hook = self._hook("layers_after")
        return int(hook(config, n_layers)) if hook else n_layers

    def layer_plan(self, config, n_layers: int):
        hook = self._hook("layer_plan")
        return hook(config, n_layers) if hook else None

    def is_identity(self, config) -> bool:
        hook = self._hook("is_identity")
        return bool(hook(config)) if hook else False

    def check_order(self, kinds_before: list[str]) -> None:
        hook = self._hook("check_order")
        if hook:
            hook(kinds_before)

    def check_for(self, config, n_layers: int) -> None:
        check = getattr(config, "check_for", None)
        if check:
            check(n_layers)

    def check_config(self, config, model_config: dict) -> None:
        """Raise RecipeError when the model `model_config` (config.json) describes cannot take this stage."""
        hook = self._hook("check_config")
        if hook:
            hook(config, model_config)

    def describe(self, params: dict) -> str:
        hook = self._hook("describe") if self._loadable() else None
        if hook:
            return hook(params or {})
        return generic_description(self.name, params)

    @property
    def role(self) -> str:
        role = getattr(self.load(), "ROLE", "structure") if self._loadable() else "structure"
        return role if role in ROLES else "structure"

    def resume_problem(self, record: dict) -> str | None:
        hook = self._hook("resume_problem") if self._loadable() else None
        return hook(record) if hook else None

    def migrate(self, params: dict, version: int) -> dict:
        hook = self._hook("migrate") if self._loadable() else None
        return hook(dict(params), version) if hook else params

    @property
    def runs_in_child(self) -> bool:
        """The stage runs in a worker process (`pipeline.child_stage`): its library may exit or abort."""
        return bool(getattr(self.load(), "RUNS_IN_CHILD", False))

    @property
    def form_custom(self) -> frozenset[str]:
        return frozenset(getattr(self.load(), "FORM_CUSTOM", ()))

    def _loadable(self) -> bool:
        """True when the module imports; tables and migration of old sessions must work without
        optional packages (a session with a gptq stage opens where gptqmodel is missing)."""
        try:
            self.load()
            return True
        except RecipeError:
            return False


def generic_description(kind: str, params: dict | None) -> str:
    shown = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in (params or {}).items()
        if isinstance(v, (int, float, str))
    )[:40]
    return kind.capitalize() + (f" ({shown})" if shown else "")


STAGES: dict[str, StageType] = {
    s.name: s
    for s in [
        StageType(
            "depth", "frankenlab.pipeline.stages.depth", "Depth pruning: remove the k least important decoder layers"
        ),
        StageType(
            "width",
            "frankenlab.pipeline.stages.width",
            "Width pruning: WANDA N:M (prunes N of every M), unstructured or magnitude",
        ),
        StageType("lora", "frankenlab.pipeline.stages.lora", "LoRA recovery fine-tuning (PEFT)"),
        StageType("gptq", "frankenlab.pipeline.stages.gptq", "GPTQ 4-bit quantization (gptqmodel)"),
        StageType(
            "eora",
            "frankenlab.pipeline.stages.eora",
            "EoRA low-rank compensation of the quantization error (gptqmodel)",
        ),
    ]
}
_ENTRY_POINTS_READ = False


def register(name: str, target: Any, summary: str = "") -> StageType:
    """Add (or replace) a stage kind: `target` is a module path or an object with Config and run."""
    kind = StageType(name, target, summary)
    STAGES[name] = kind
    return kind


def unregister(name: str) -> None:
    STAGES.pop(name, None)


def _read_entry_points() -> None:
    global _ENTRY_POINTS_READ
    if _ENTRY_POINTS_READ:
        return
    _ENTRY_POINTS_READ = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="frankenlab.stages"):
        STAGES.setdefault(ep.name, StageType(ep.name, ep.value))


def stage_names() -> list[str]:
    _read_entry_points()
    return list(STAGES)


def stage_kind(name: str) -> StageType:
    _read_entry_points()
    if name not in STAGES:
        raise RecipeError(f"unknown stage kind {name!r}; known kinds: {', '.join(STAGES)}")
    return STAGES[name]


def known_kind(name: str) -> StageType | None:
    """The kind, or None when this frankenlab has no such kind (an old or foreign session)."""
    _read_entry_points()
    return STAGES.get(name)
