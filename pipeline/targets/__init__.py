"""Hardware memory budgets as data: TOML files of `[targets.NAME]` tables.

A target has either one `memory` (GPUs, boards: weights, KV cache and activations share it) or
separate `weights` and `activations` memories (the thesis' Siracusa SoC: MRAM for weights, SRAM
tile memory for activations). Sizes are "4 MiB", "11 GiB", "256 KiB", "8 GB" (decimal) or a
whole number of bytes. `l1` is informational. The verdict says "fits" or by what factor a
model misses: the thesis' point is that small LLMs miss a 4 MiB budget, and by how much.
Bundled targets sit beside this file; users add their own with `--targets-file`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from frankenlab.evals import toml
from frankenlab.evals.config import require
from frankenlab.evals.errors import RecipeError

TARGETS_DIR = Path(__file__).parent
KNOWN_KEYS = ("label", "memory", "weights", "activations", "l1", "notes")
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
}


def parse_size(value, where: str) -> int:
    """'4 MiB' -> 4194304; '8 GB' -> 8e9; an int is bytes."""
    if isinstance(value, bool):
        raise RecipeError(f'{where}: expected a size like "4 MiB", got {value!r}')
    if isinstance(value, (int, float)):
        require(value > 0, f"{where}: a size must be positive, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise RecipeError(f'{where}: expected a size like "4 MiB", got {value!r}')
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    unit = (m.group(2) if m else "").lower() or "b"
    require(
        m is not None and unit in _UNITS,
        f'{where}: {value!r} is not a size; write a number and a unit such as "4 MiB", "256 KiB", "11 GiB" or "8 GB"',
    )
    size = float(m.group(1)) * _UNITS[unit]
    require(size > 0, f"{where}: a size must be positive, got {value!r}")
    return int(size)


def _percent(x: float) -> str:
    return f"{x:.0%}" if x >= 0.1 else f"{x * 100:.2g}%"


def _times(x: float) -> str:
    return f"{x:.2f}\u00d7" if x < 2 else f"{x:.1f}\u00d7"


@dataclass(frozen=True)
class Check:
    """One budget comparison: what is needed against what the memory holds."""

    what: str  # "weights", "activations", "everything"
    memory: str  # the memory's name in the target ("weights", "activations", "memory")
    need: int
    have: int

    @property
    def fits(self) -> bool:
        return self.need <= self.have

    @property
    def factor(self) -> float:
        return self.need / self.have

    @property
    def text(self) -> str:
        if self.fits:
            return f"fits ({_percent(self.factor)} of {self.memory})"
        return f"misses by {_times(self.factor)}"

    @property
    def short(self) -> str:
        return f"fits {_percent(self.factor)}" if self.fits else f"misses {_times(self.factor)}"

    def to_dict(self) -> dict:
        return {
            "what": self.what,
            "memory": self.memory,
            "need": self.need,
            "have": self.have,
            "fits": self.fits,
            "factor": self.factor,
            "text": self.text,
            "short": self.short,
        }


@dataclass(frozen=True)
class Target:
    name: str
    label: str = ""
    memory: int | None = None  # one shared memory
    weights: int | None = None  # separate weight memory
    activations: int | None = None  # separate activation (+ KV cache) memory
    l1: int | None = None
    notes: str = ""
    source: str = ""

    def checks(self, weights_bytes: int, runtime_bytes: int) -> list[Check]:
        """Weights against the weight memory, KV cache + activations against theirs (or all in one)."""
        if self.memory is not None:
            return [Check("everything", "memory", weights_bytes + runtime_bytes, self.memory)]
        out = [Check("weights", "weights", weights_bytes, self.weights)]
        if self.activations is not None:
            out.append(Check("kv cache + activations", "activations", runtime_bytes, self.activations))
        return out

    def verdict(self, footprint) -> list[Check]:
        """`footprint` is a pipeline.footprint.Footprint or its summary dict."""
        if isinstance(footprint, dict):
            return self.checks(footprint["weights_bytes"], footprint["runtime_bytes"])
        return self.checks(footprint.weights_bytes, footprint.runtime_bytes)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


def _target(name: str, raw, where: str) -> Target:
    require(isinstance(raw, dict), f"{where}: [targets.{name}] must be a table")
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    require(
        not unknown,
        f"{where}: target {name!r} has unknown key(s) {', '.join(unknown)}; known keys are {', '.join(KNOWN_KEYS)}",
    )
    require(
        re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None,
        f"{where}: target name {name!r} may hold only letters, digits, '-', '_' and '.'",
    )
    sizes = {
        k: parse_size(raw[k], f"{where}: targets.{name}.{k}")
        for k in ("memory", "weights", "activations", "l1")
        if k in raw
    }
    require(
        "memory" in sizes or "weights" in sizes,
        f'{where}: target {name!r} needs either memory = "..." (one shared memory) or weights = "..." '
        '(and optionally activations = "...") for separate memories',
    )
    require(
        not ("memory" in sizes and ("weights" in sizes or "activations" in sizes)),
        f"{where}: target {name!r} gives both memory and weights/activations; use memory for one shared "
        "memory, or weights + activations for separate ones",
    )
    for k in ("label", "notes"):
        require(isinstance(raw.get(k, ""), str), f"{where}: targets.{name}.{k} must be text")
    return Target(
        name,
        raw.get("label", name),
        sizes.get("memory"),
        sizes.get("weights"),
        sizes.get("activations"),
        sizes.get("l1"),
        raw.get("notes", ""),
        where,
    )


def parse_targets(text: str, where: str = "<text>") -> dict[str, Target]:
    try:
        data = toml.loads(text)
    except toml.TOMLDecodeError as exc:
        raise RecipeError(f"{where}: not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"targets"})
    require(
        not extra,
        f"{where}: unknown top-level key(s) {', '.join(extra)}; a targets file holds only [targets.NAME] tables",
    )
    table = data.get("targets")
    require(
        isinstance(table, dict) and table,
        f'{where}: no targets found; define at least one table such as\n[targets.myboard]\nmemory = "8 GiB"',
    )
    return {name: _target(name, raw, where) for name, raw in table.items()}


def load_targets(*extra_files: str | Path) -> dict[str, Target]:
    """The bundled targets, then each user file (a user target may replace a bundled one by name)."""
    out: dict[str, Target] = {}
    for path in sorted(TARGETS_DIR.glob("*.toml")):
        out.update(parse_targets(path.read_text(), path.name))
    for f in extra_files:
        p = Path(f).expanduser()
        require(p.is_file(), f"targets file {str(f)!r} does not exist")
        out.update(parse_targets(p.read_text(), str(p)))
    return out


def get_target(name: str, targets: dict[str, Target] | None = None) -> Target:
    targets = load_targets() if targets is None else targets
    require(name in targets, f"unknown target {name!r}; known targets: {', '.join(sorted(targets))}")
    return targets[name]
