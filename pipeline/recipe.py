"""A recipe: the model source, calibration and evaluation settings, and the ordered stages.

Plain data, TOML on disk. Loading validates everything it can without weights; `check_for(n)`
validates what needs the model's depth (protected layers) once the model config is known.
Everything kind-specific is asked of the stage registry (order rules, layers after a stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from frankenlab.evals import toml
from frankenlab.evals.config import from_dict, option, require, to_dict
from frankenlab.evals.errors import RecipeError
from frankenlab.evals.suite import EvalConfig
from frankenlab.pipeline.atomic import atomic_write_text
from frankenlab.pipeline.calibration import CalibrationConfig
from frankenlab.pipeline.stages import stage_kind, stage_names

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class ModelSpec:
    source: str = option(
        "default",
        help='"default" (the bundled SmolLM2-135M-Instruct), an HF folder, a .gguf file, a hub id, '
        "or a GPTQ / EoRA stage folder",
    )
    dtype: str = option(
        "auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16 (or fp32, bf16, fp16)"
    )
    device: str = option("auto", help="auto, cpu or cuda[:N]")
    trust_remote_code: bool = option(False, help="allow model code from the hub")

    def __post_init__(self):
        require(
            self.dtype in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
            f"unknown dtype {self.dtype!r}",
        )


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config: Any  # the stage module's Config instance
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.kind

    def params(self) -> dict:
        return self.config.to_dict() if hasattr(self.config, "to_dict") else to_dict(self.config)


@dataclass
class Recipe:
    name: str = "untitled"
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    stages: list[StageSpec] = field(default_factory=list)

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        data = dict(data)
        known = {"name", "description", "model", "calibration", "evaluation", "stages"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"recipe: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        model = data.get("model", {})
        if isinstance(model, str):
            model = {"source": model}
        try:
            evaluation = from_dict(EvalConfig, data.get("evaluation"), "evaluation")
        except ValueError as exc:
            raise RecipeError(str(exc) if str(exc).startswith("evaluation") else f"evaluation: {exc}") from None
        stages = []
        raw_stages = data.get("stages", [])
        if not isinstance(raw_stages, list):
            raise RecipeError("stages must be a list of tables ([[stages]] in TOML)")
        for i, raw in enumerate(raw_stages, 1):
            if not isinstance(raw, dict) or "kind" not in raw:
                raise RecipeError(f"stage {i}: every stage needs a kind (one of {', '.join(stage_names())})")
            raw = dict(raw)
            kind, name = raw.pop("kind"), raw.pop("name", "")
            stype = stage_kind(kind)
            stages.append(StageSpec(kind, from_dict(stype.Config, raw, f"stage {i} ({kind})"), name))
            try:  # e.g. eora needs a gptq stage before it
                stype.check_order([s.kind for s in stages[:-1]])
            except RecipeError as exc:
                raise RecipeError(f"stage {i} ({kind}): {exc}") from None
        return cls(
            name=str(data.get("name", "untitled")),
            description=str(data.get("description", "")),
            model=from_dict(ModelSpec, model, "model"),
            calibration=from_dict(CalibrationConfig, data.get("calibration"), "calibration"),
            evaluation=evaluation,
            stages=stages,
        )

    @classmethod
    def loads(cls, text: str) -> Recipe:
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as exc:
            raise RecipeError(f"not valid TOML: {exc}") from None
        if not data:  # a 0-byte or comment-only file would run the default evaluation as "untitled"
            raise RecipeError(
                "the recipe is empty: give it at least a name and [[stages]] or an [evaluation] "
                "(start from a bundled one: `frankenlab recipes`)"
            )
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file() and (RECIPES_DIR / f"{path}.toml").is_file():
            p = RECIPES_DIR / f"{path}.toml"  # a bundled recipe by name
        if not p.is_file():
            raise RecipeError(f"recipe file {path} does not exist (bundled recipes: {', '.join(bundled_recipes())})")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"{p} is not a text file (not UTF-8): a recipe is a TOML text file") from None
        except OSError as exc:
            raise RecipeError(f"cannot read {p} ({exc.strerror or exc}): check its permissions") from None
        try:
            return cls.loads(text)
        except RecipeError as exc:
            raise RecipeError(f"{p}: {exc}") from None

    # -- writing ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "model": to_dict(self.model),
            "calibration": to_dict(self.calibration),
            "evaluation": to_dict(self.evaluation),
            "stages": [{"kind": s.kind, **({"name": s.name} if s.name else {}), **s.params()} for s in self.stages],
        }

    def dumps(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        atomic_write_text(p, self.dumps())
        return p

    # -- checks that need the model ---------------------------------------------------------------
    def check_for(self, n_layers: int) -> None:
        """Validate stage parameters against the model's depth, following the stages in order."""
        for i, s in enumerate(self.stages, 1):
            stype = stage_kind(s.kind)
            try:
                stype.check_for(s.config, n_layers)
                n_layers = stype.layers_after(s.config, n_layers)
            except (RecipeError, ValueError) as exc:
                err = RecipeError(f"stage {i} ({s.kind}): {exc}")
                err.stage = i  # the refusal belongs to this stage (counted within this recipe)
                raise err from None

    def check_config(self, model_config: dict) -> None:
        """Validate stage parameters against the model's config.json (matrix widths), before weights load."""
        for i, s in enumerate(self.stages, 1):
            try:
                stage_kind(s.kind).check_config(s.config, model_config)
            except (RecipeError, ValueError) as exc:
                err = RecipeError(f"stage {i} ({s.kind}): {exc}")
                err.stage = i
                raise err from None


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
