"""The stage registry: a stage kind is a module with a frozen `Config` and `run(model, ctx, config)`.

Modules are imported lazily so that reading a recipe never imports gptqmodel or peft.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..config import RecipeError


@dataclass(frozen=True)
class StageKind:
    name: str
    module: str
    summary: str

    def load(self):
        try:
            return importlib.import_module(self.module)
        except ImportError as exc:
            raise RecipeError(f"stage {self.name!r} is not available: {exc}. Re-run the README's set-up "
                              "(it installs the optional packages this stage needs)") from exc


STAGES: dict[str, StageKind] = {s.name: s for s in [
    StageKind("depth", "pipeline.stages.depth", "Depth pruning: remove the k least important decoder layers"),
    StageKind("width", "pipeline.stages.width", "Width pruning: WANDA N:M (prunes N of every M), unstructured or magnitude"),
    StageKind("lora", "pipeline.stages.lora", "LoRA recovery fine-tuning (PEFT)"),
    StageKind("gptq", "pipeline.stages.gptq", "GPTQ 4-bit quantization (gptqmodel)"),
    StageKind("eora", "pipeline.stages.eora", "EoRA low-rank compensation of the quantization error (gptqmodel)"),
]}


def stage_kind(name: str) -> StageKind:
    if name not in STAGES:
        raise RecipeError(f"unknown stage kind {name!r}; known kinds: {', '.join(STAGES)}")
    return STAGES[name]
