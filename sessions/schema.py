"""The session file's JSON Schema (draft 2020-12 subset) and the small validator that applies it.

The schema is the machine-readable half of sessions/SCHEMA.md; `frankenlab sessions --schema`
prints it. The validator understands only what the schema uses (type, const, enum, required,
properties, additionalProperties, items, minimum), so loading needs no extra package and a
session is never more than JSON data: nothing in it is imported, evaluated or unpickled.
Unknown keys are allowed (a newer minor writer may add some); they survive a load/save round trip.
"""

from __future__ import annotations

import json
from typing import Any

FORMAT = "frankenlab-session"
SCHEMA_VERSION = 3

_NUM = {"type": ["number", "null"]}
_INT = {"type": ["integer", "null"]}
_STR = {"type": ["string", "null"]}

METRIC_SCHEMA = {
    "type": "object",
    "description": "One measured number. Extra keys (tokens, seconds, exact_match, ...) are allowed.",
    "required": ["name", "value"],
    "properties": {
        "name": {"type": "string", "description": "perplexity, triviaqa_closed, triviaqa_open, ..."},
        "value": {"type": ["number", "null"], "description": "the number; NaN/Infinity allowed (diverged)"},
        "protocol": {"type": "string", "description": "how it was measured, e.g. wikitext2-concat-512:first32"},
    },
}

STAGE_SCHEMA = {
    "type": "object",
    "required": ["index", "kind", "status"],
    "properties": {
        "index": {"type": "integer", "minimum": 0, "description": "0 = baseline, 1.. = recipe stages"},
        "kind": {"type": "string", "description": "baseline, depth, width, lora, gptq, eora"},
        "name": {"type": "string"},
        "params": {"type": "object", "description": "the stage's config as plain data"},
        "status": {"enum": ["pending", "running", "done", "failed", "cancelled", "skipped"]},
        "metrics": {"type": "array", "items": METRIC_SCHEMA},
        "params_count": _INT,
        "params_nonzero": _INT,
        "num_layers": _INT,
        "footprint": {"type": ["object", "null"], "description": "memory footprint by storage format"},
        "seconds": _NUM,
        "artifact": {**_STR, "description": "folder of the model saved after this stage"},
        "report": {"type": "object"},
        "details": {"type": "object"},
        "error": _STR,
        "reused_from": {**_STR, "description": "session id this record was copied from (replay --from-stage)"},
    },
}

EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "stage"],
    "properties": {
        "event": {
            "type": "string",
            "description": "RunStarted, ModelReady, StageStarted, MetricMeasured, LogLine, StageFinished, "
            "RunFailed, RunCancelled, RunFinished",
        },
        "stage": {"type": "integer", "description": "-1 = loading, 0 = baseline, 1.. = stages"},
        "time": {"type": "number", "description": "unix seconds"},
    },
}

SESSION_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"https://frankenlab.invalid/session-v{SCHEMA_VERSION}.schema.json",
    "title": f"frankenlab session, schema version {SCHEMA_VERSION}",
    "type": "object",
    "required": ["schema_version", "recipe", "stages"],
    "properties": {
        "format": {"const": FORMAT},
        "schema_version": {"type": "integer", "minimum": 1},
        "id": {"type": "string"},
        "name": {"type": "string"},
        "status": {"enum": ["running", "done", "failed", "cancelled"]},
        "created": {"type": "number"},
        "updated": {"type": "number"},
        "writer": {"type": "object", "properties": {"program": {"type": "string"}, "version": {"type": "string"}}},
        "recipe": {
            "type": "object",
            "description": "the recipe as plain data (pipeline.recipe.Recipe.to_dict)",
            "properties": {
                "name": {"type": "string"},
                "model": {"type": "object"},
                "calibration": {"type": "object"},
                "evaluation": {"type": "object"},
                "stages": {"type": "array", "items": {"type": "object", "required": ["kind"]}},
            },
        },
        "model_source": {
            "type": "object",
            "properties": {
                "ref": {"type": "string"},
                "kind": {"type": "string", "description": "default, folder, gguf, hub, gptq or gptq+eora"},
                "adapter": {"type": "string", "description": "EoRA adapter folder of a gptq+eora source"},
                "path": {"type": "string"},
                "name": {"type": "string"},
                "gguf_file": {"type": "string"},
                "weights": {
                    "type": ["object", "null"],
                    "required": ["algorithm", "digest"],
                    "properties": {
                        "algorithm": {"const": "sha256"},
                        "digest": {"type": "string"},
                        "files": {"type": "array", "items": {"type": "string"}},
                        "bytes": {"type": "integer"},
                    },
                },
            },
        },
        "environment": {
            "type": "object",
            "properties": {
                "python": _STR,
                "platform": _STR,
                "torch": _STR,
                "transformers": _STR,
                "cuda": _STR,
                "peft": _STR,
                "gptqmodel": _STR,
                "datasets": _STR,
                "device": _STR,
                "dtype": _STR,
                "gpu": _STR,
                "threads": _INT,
                "seed": _INT,
                "quant_kernel": _STR,
            },
        },
        "stages": {"type": "array", "items": STAGE_SCHEMA},
        "events": {"type": "array", "items": EVENT_SCHEMA},
        "owner": {
            "type": ["object", "null"],
            "description": "the process that ran it: a running session whose owner is gone reads as interrupted",
            "properties": {"pid": {"type": "integer"}, "host": {"type": "string"}, "started": {"type": "number"}},
        },
        "replay_of": {
            "type": ["object", "null"],
            "properties": {"session_id": {"type": "string"}, "path": _STR, "from_stage": {"type": "integer"}},
        },
    },
}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def validate(value: Any, schema: dict, where: str = "") -> list[str]:
    """Problems with `value` against `schema`, each prefixed by its place (e.g. stages[2].status)."""
    here = where or "(top level)"
    if "const" in schema and value != schema["const"]:
        return [f"{here}: must be {schema['const']!r}, got {_short(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{here}: must be one of {', '.join(map(str, schema['enum']))}, got {_short(value)}"]
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](value) for t in types):
            return [f"{here}: expected {' or '.join(types)}, got {_short(value)}"]
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        return [f"{here}: must be at least {schema['minimum']}, got {value}"]
    problems: list[str] = []
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{here}: missing {key!r}")
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key in value:
                problems += validate(value[key], sub, f"{where}.{key}" if where else key)
        if schema.get("additionalProperties") is False:
            problems += [f"{here}: unknown key {k!r}" for k in value if k not in props]
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += validate(item, schema["items"], f"{where}[{i}]")
    return problems
