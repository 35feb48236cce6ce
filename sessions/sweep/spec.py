"""A sweep file: a base recipe plus axes, expanded into one recipe per configuration.

TOML on disk (sessions/SCHEMA.md, "Sweep files"): `[base]` is a recipe (or `base = "NAME"`, a
bundled recipe or a recipe file), `[axes]` maps an axis to its list of values. Axis kinds:
- `"STAGE.FIELD"` (`depth.k`, `width.pattern`, `lora.dataset`): one stage parameter; STAGE is a
  stage kind or a stage's name in the base recipe. A per-layer map field takes tables as values
  (`"width.patterns" = [{ "0-3" = "none", "4-7" = "2:4" }, ...]`); node keys use its canonical form.
  The value "none" leaves the stage out, and so does a value that makes the stage change nothing
  (its kind's `is_identity` hook: Depth k=0).
- `"calibration.FIELD"`, `"evaluation.FIELD"`, `"model.FIELD"`: a recipe section's field.
- `plan`: Franken-LLaMA layer plans ("0-3,5,5,6-29") for the depth stage (added first if the base
  has none); "none" leaves it out.
- any other name (`quant`): alternative stage sequences, each "none", "gptq+eora" (kinds joined
  by "+", parameters from `[defaults.KIND]`) or a list of stage tables; they go where the base's
  stages hold `{ slot = "quant" }`, else after the base's stages.
The cartesian product of the axes, in file order, gives the configurations; every one is checked
with the recipe's own validation (and against the model's depth when its config.json is at hand),
and an error names the configuration and the field.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from frankenlab.evals import toml
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.recipe import Recipe
from frankenlab.pipeline.stages import stage_kind

SWEEPS_DIR = Path(__file__).parent / "sweeps"
SECTIONS = ("calibration", "evaluation", "model")
NONE = "none"


class SweepError(ValueError):
    """A sweep file that cannot be run; the message names the file, configuration and field."""


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple

    @property
    def kind(self) -> str:
        if self.name == "plan":
            return "plan"
        head = self.name.split(".", 1)[0]
        if "." not in self.name:
            return "sequence"
        return "section" if head in SECTIONS else "stage"


@dataclass
class Configuration:
    index: int
    values: dict  # axis name -> value
    recipe: Recipe

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_text(v)}" for k, v in self.values.items()) or "base"

    @property
    def slug(self) -> str:
        text = "_".join(f"{k.split('.')[-1]}{_text(v)}" for k, v in self.values.items()) or "base"
        return f"{self.index:02d}-" + re.sub(r"[^A-Za-z0-9.+-]+", "-", text.replace(":", "of"))[:60]


@dataclass
class Sweep:
    name: str
    base: dict  # the base recipe as plain data
    axes: list[Axis]
    defaults: dict = field(default_factory=dict)  # kind -> params for sequence-axis stages
    description: str = ""
    source: str = ""  # the file it was read from
    text: str = ""  # the file's text, copied into the sweep folder

    @property
    def size(self) -> int:
        """How many configurations the axes make (their product), without making any."""
        n = 1
        for a in self.axes:
            n *= len(a.values)
        return n

    def expand(self, check_depth: bool = True) -> list[Configuration]:
        """Every configuration, validated; raises SweepError naming the configuration and field."""
        combos = itertools.product(*(a.values for a in self.axes)) if self.axes else [()]
        depth_cache: dict = {}
        return [self._configuration(i, combo, depth_cache, check_depth) for i, combo in enumerate(combos, 1)]

    def configurations(self, indices, check_depth: bool = True) -> list[Configuration]:
        """Only configurations `indices` (1-based, the order `expand` gives), validated, made
        without walking the product: for a look at a huge grid (`frankenlab sweep --dry-run`)."""
        depth_cache: dict = {}
        out = []
        for i in indices:
            rest, combo = i - 1, []
            for a in reversed(self.axes):  # the last axis varies fastest, as itertools.product does
                rest, j = divmod(rest, len(a.values))
                combo.append(a.values[j])
            out.append(self._configuration(i, tuple(reversed(combo)), depth_cache, check_depth))
        return out

    def sample_indices(self, first: int = 20) -> list[int]:
        """The first `first` configurations, the last, and enough others that every value of every
        axis appears at least once (each axis varied alone from the first configuration)."""
        n = self.size
        picked = set(range(1, min(n, first) + 1)) | {n}
        stride = 1
        for a in reversed(self.axes):
            picked.update(1 + j * stride for j in range(len(a.values)))
            stride *= len(a.values)
        return sorted(picked)

    def _configuration(self, i: int, combo: tuple, depth_cache: dict, check_depth: bool) -> Configuration:
        values = {a.name: v for a, v in zip(self.axes, combo, strict=False)}
        where = f"configuration {i} ({' '.join(f'{k}={_text(v)}' for k, v in values.items()) or 'base'})"
        try:
            data = self._apply(values)
            data["name"] = f"{self.name}: {' '.join(f'{k}={_text(v)}' for k, v in values.items()) or 'base'}"
            recipe = Recipe.from_dict(data)
            if check_depth:
                src = recipe.model.source
                if src not in depth_cache:
                    from frankenlab.pipeline.preflight import model_depth

                    depth_cache[src] = model_depth(src)
                if depth_cache[src] is not None:
                    recipe.check_for(depth_cache[src])
        except (RecipeError, ValueError) as exc:
            raise SweepError(f"{self.source or self.name}: {where}: {exc}") from None
        return Configuration(i, values, recipe)

    def node_bound(self) -> int:
        """At most how many nodes (shared prefixes) the grid has, counted from the axes alone: the
        baseline once per combination of section axes, then for each stage position the product of
        the axes that shape it or an earlier one (a sequence axis adds each value's stages). Exact
        when no two combinations give the same stages ("none" and identity values can)."""
        sections = [a for a in self.axes if a.kind == "section"]
        base = 1
        for a in sections:
            base *= len(a.values)
        stages = list(self.base.get("stages", []))
        where: dict[str, int] = {}
        for a in self.axes:
            if a.kind == "stage":
                with contextlib.suppress(RecipeError):
                    where[a.name] = _find(stages, a.name.split(".", 1)[0], a.name)
            elif a.kind == "plan":
                i = _find(stages, "depth", a.name, required=False)
                where[a.name] = -1 if i is None else i
        positions: list[tuple[float, str | None]] = []  # (order, sequence axis or None)
        if any(v == -1 for v in where.values()):
            positions.append((-1, None))
        for j, st in enumerate(stages):
            slot = st.get("slot") if isinstance(st, dict) else None
            positions.append((j, slot))
        for a in self.axes:  # sequence axes without a slot go last, in file order
            if a.kind == "sequence" and not any(slot == a.name for _, slot in positions):
                positions.append((len(stages) + len(positions), a.name))
        total, shaping = base, base
        for order, slot in positions:
            if slot is not None:
                axis = next((a for a in self.axes if a.name == slot), None)
                if axis is None:
                    continue
                lengths = [len(self._sequence(axis.name, v)) for v in axis.values]
                total += shaping * sum(lengths)
                shaping *= len(axis.values)
                continue
            for a in self.axes:
                if where.get(a.name) == order:
                    shaping *= len(a.values)
            total += shaping
        return total

    # -- applying one combination of axis values to the base --------------------------------------
    def _apply(self, values: dict) -> dict:
        data = copy.deepcopy(self.base)
        stages = [dict(s) for s in data.get("stages", [])]
        drop: set[int] = set()
        for name, value in values.items():
            axis = next(a for a in self.axes if a.name == name)
            if axis.kind == "section":
                section, key = name.split(".", 1)
                sec = data.get(section, {})
                sec = {"source": sec} if isinstance(sec, str) else dict(sec)
                sec[key] = list(value) if isinstance(value, tuple) else value
                data[section] = sec
            elif axis.kind == "plan":
                i = _find(stages, "depth", name, required=False)
                if i is None:
                    stages.insert(0, {"kind": "depth"})
                    drop = {d + 1 for d in drop}
                    i = 0
                if value == NONE:
                    drop.add(i)
                else:
                    for k in ("k", "layers"):
                        stages[i].pop(k, None)
                    stages[i]["plan"] = str(value)
            elif axis.kind == "stage":
                target, key = name.split(".", 1)
                i = _find(stages, target, name)
                if value == NONE:
                    drop.add(i)
                else:
                    stages[i][key] = list(value) if isinstance(value, tuple) else value
        kept = [s for j, s in enumerate(stages) if j not in drop and not _identity(s)]
        for name, value in values.items():  # sequence axes fill their slot (or go last)
            if next(a for a in self.axes if a.name == name).kind == "sequence":
                seq = self._sequence(name, value)
                slot = next((j for j, s in enumerate(kept) if s.get("slot") == name), None)
                if slot is None:
                    kept += seq
                else:
                    kept[slot : slot + 1] = seq
        stray = [s["slot"] for s in kept if "slot" in s]
        if stray:
            raise RecipeError(f'the base recipe holds {{ slot = "{stray[0]}" }} but there is no axis {stray[0]!r}')
        data["stages"] = kept
        return data

    def _sequence(self, name: str, value) -> list[dict]:
        if value == NONE or value == [] or value == ():
            return []
        if isinstance(value, str):
            kinds = [k.strip() for k in value.split("+") if k.strip()]
            return [{"kind": k, **self.defaults.get(k, {})} for k in kinds]
        if isinstance(value, (list, tuple)) and all(isinstance(s, dict) and "kind" in s for s in value):
            return [dict(s) for s in value]
        raise RecipeError(
            f'axis {name!r}: {value!r} is not a stage sequence; write "none", "gptq+eora" '
            'or a list of stage tables such as [{ kind = "gptq", bits = 4 }]'
        )


def _text(v) -> str:
    if isinstance(v, dict):  # a layer-range map (width.patterns, gptq.layer_bits): "0-3=none,4-7=2:4"
        return ",".join(f"{k}={x}" for k, x in v.items()) or NONE
    if isinstance(v, (list, tuple)):
        return "+".join(s.get("kind", "?") if isinstance(s, dict) else str(s) for s in v) or NONE
    return str(v)


def _find(stages: list[dict], target: str, axis: str, required: bool = True) -> int | None:
    hits = [i for i, s in enumerate(stages) if s.get("name") == target]
    hits = hits or [i for i, s in enumerate(stages) if s.get("kind") == target]
    if len(hits) > 1:
        raise RecipeError(
            f"axis {axis!r}: the base recipe has {len(hits)} {target} stages; give each a name "
            f'(name = "...") and use it in the axis'
        )
    if not hits and required:
        known = ", ".join(s.get("name") or s.get("kind", "?") for s in stages) or "none"
        raise RecipeError(
            f"axis {axis!r}: the base recipe has no stage {target!r} (its stages: {known}); add one to [[base.stages]]"
        )
    return hits[0] if hits else None


def _identity(stage: dict) -> bool:
    """A stage that changes nothing (Depth k=0): the kind's `is_identity` hook on its config."""
    if "slot" in stage or "kind" not in stage:
        return False
    try:
        from frankenlab.evals.config import from_dict

        stype = stage_kind(stage["kind"])
        cfg = from_dict(stype.Config, {k: v for k, v in stage.items() if k not in ("kind", "name")}, stage["kind"])
        return stype.is_identity(cfg)
    except (RecipeError, ValueError, TypeError):
        return False  # the recipe's validation reports it


# -- reading ----------------------------------------------------------------------------------------
def _flatten(axes: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in axes.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _check_axis(axis: Axis, base: dict, where: str) -> None:
    if not axis.values:
        raise SweepError(f"{where}: axis {axis.name!r} has no values; give a list such as [0, 2, 4]")
    if axis.kind == "section":
        section, key = axis.name.split(".", 1)
        from frankenlab.evals.suite import EvalConfig
        from frankenlab.pipeline.calibration import CalibrationConfig
        from frankenlab.pipeline.recipe import ModelSpec

        cls = {"model": ModelSpec, "calibration": CalibrationConfig, "evaluation": EvalConfig}[section]
        names = [f.name for f in fields(cls)]
        if key not in names:
            raise SweepError(
                f"{where}: axis {axis.name!r}: {section} has no field {key!r} (fields: {', '.join(names)})"
            )
    elif axis.kind == "stage":
        target, key = axis.name.split(".", 1)
        stages = base.get("stages", [])
        try:
            i = _find(stages, target, axis.name)
            stype = stage_kind(stages[i].get("kind", ""))
        except RecipeError as exc:
            raise SweepError(f"{where}: {exc}") from None
        names = [f.name for f in fields(stype.Config)]
        if key not in names:
            raise SweepError(
                f"{where}: axis {axis.name!r}: a {stype.name} stage has no field {key!r} (fields: {', '.join(names)})"
            )


def parse_sweep(text: str, source: str = "<sweep>") -> Sweep:
    try:
        data = toml.loads(text)
    except toml.TOMLDecodeError as exc:
        raise SweepError(f"{source}: not valid TOML: {exc}") from None
    known = {"name", "description", "base", "axes", "defaults"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {', '.join(unknown)}; a sweep has {', '.join(sorted(known))}")
    base = data.get("base")
    if isinstance(base, str):  # a bundled recipe name or a recipe file
        try:
            base = Recipe.load(base).to_dict()
        except RecipeError as exc:
            raise SweepError(f"{source}: base: {exc}") from None
    if not isinstance(base, dict):
        raise SweepError(f'{source}: a sweep needs a base recipe: a [base] table (a recipe) or base = "RECIPE"')
    axes_raw = data.get("axes", {})
    if not isinstance(axes_raw, dict):
        raise SweepError(f'{source}: [axes] must be a table of lists, e.g. "depth.k" = [0, 2, 4]')
    axes = []
    for name, values in _flatten(axes_raw).items():
        if not isinstance(values, list):
            raise SweepError(f"{source}: axis {name!r} must be a list of values, got {values!r}")
        axis = Axis(
            name,
            tuple(tuple(v) if isinstance(v, list) and not any(isinstance(x, dict) for x in v) else v for v in values),
        )
        _check_axis(axis, base, source)
        axes.append(axis)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict) or not all(isinstance(v, dict) for v in defaults.values()):
        raise SweepError(f"{source}: [defaults.KIND] tables hold stage parameters, e.g. [defaults.gptq] bits = 4")
    return Sweep(
        str(data.get("name") or Path(source).stem), base, axes, defaults, str(data.get("description", "")), source, text
    )


def bundled_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.toml"))


def load_sweep(path: str | Path) -> Sweep:
    """A sweep file, or a bundled sweep by name (`thesis-table-4.1`, `demo`)."""
    p = Path(path)
    if not p.is_file() and (SWEEPS_DIR / f"{path}.toml").is_file():
        p = SWEEPS_DIR / f"{path}.toml"
    if not p.is_file():
        raise SweepError(f"sweep file {path} does not exist (bundled sweeps: {', '.join(bundled_sweeps())})")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SweepError(f"{p} is not a text file (not UTF-8): a sweep is a TOML text file") from None
    except OSError as exc:
        raise SweepError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    return parse_sweep(text, str(p))
