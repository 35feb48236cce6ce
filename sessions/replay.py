"""Replay a saved session: run its recipe again and set every new number beside the saved one.

`replay` re-runs the recipe through `sessions.recorder.record_run` into a new run folder, either
from the start or, with `from_stage=K`, from the model saved after stage K-1 (the session's
artifact path). Each metric is matched by stage, name and protocol; a difference larger than the
relative tolerance is flagged. Parameter counts must match exactly. What differs in the
environment (device, dtype, library versions) or in the weights' hash is reported as notes,
because that is the usual reason for a changed number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path

from frankenlab.pipeline.stages import known_kind
from frankenlab.sessions.session import Session, SessionError, StageRecord

DEFAULT_TOLERANCE = 0.01  # relative: 1 %
ENV_KEYS = ("device", "dtype", "gpu", "torch", "transformers", "cuda", "threads")
COUNTS = (("params_count", "params"), ("params_nonzero", "nonzero params"), ("num_layers", "layers"))


@dataclass(frozen=True)
class MetricDiff:
    stage: int
    kind: str
    name: str
    protocol: str
    saved: float | None
    new: float | None
    tolerance: float  # relative; 0 = must be equal

    @property
    def diff(self) -> float | None:
        if self.saved is None or self.new is None:
            return None
        if not (math.isfinite(self.saved) and math.isfinite(self.new)):
            return 0.0 if self.saved == self.new else math.nan
        return self.new - self.saved

    @property
    def relative(self) -> float | None:
        d = self.diff
        if d is None or not self.saved or not math.isfinite(self.saved):
            return None
        return d / abs(self.saved)

    @property
    def status(self) -> str:
        """ok | changed | missing (saved, not measured again) | new (measured, not in the saved session)."""
        if self.new is None:
            return "missing"
        if self.saved is None:
            return "new"
        d = self.diff
        if d is None or math.isnan(d):
            return "changed"
        limit = self.tolerance * abs(self.saved) if self.saved else self.tolerance
        return "ok" if abs(d) <= limit + 1e-12 else "changed"

    @property
    def flagged(self) -> bool:
        return self.status != "ok"


@dataclass
class ReplayResult:
    saved: Session
    new: Session
    diffs: list[MetricDiff]
    from_stage: int = 1
    tolerance: float = DEFAULT_TOLERANCE
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[MetricDiff]:
        return [d for d in self.diffs if d.flagged]

    @property
    def compared(self) -> list[MetricDiff]:
        """The numbers set beside each other: saved and measured again."""
        return [d for d in self.diffs if d.saved is not None and d.new is not None]

    @property
    def metrics_compared(self) -> list[MetricDiff]:
        """The compared numbers that are metrics (not parameter or layer counts)."""
        return [d for d in self.compared if d.protocol != "count"]

    @property
    def ok(self) -> bool:
        """The replay finished, compared at least one number, and every number is within tolerance."""
        return self.new.status == "done" and bool(self.compared) and not self.flagged

    def nothing_compared(self) -> str | None:
        """Why nothing (or no metric) could be compared, or None when metrics were."""
        if self.metrics_compared:
            return None
        since = f" from stage {self.from_stage} on" if self.from_stage > 1 else ""
        if not self.compared:
            return (
                f"nothing to compare: the saved session holds no finished stage with numbers{since}, so the "
                "replay's numbers have nothing to be set beside"
            )
        return (
            f"no metric to compare{since}: the saved session measured none (is its evaluation off?); "
            "only parameter and layer counts were compared"
        )


def _value(m: dict | None) -> float | None:
    if m is None:
        return None
    v = m.get("value")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def diff_stage(saved: StageRecord, new: StageRecord | None, tolerance: float) -> list[MetricDiff]:
    """Every metric and count of one stage, saved beside new."""
    out = []
    new_metrics = new.metrics if new is not None and new.status == "done" else []
    keys = [(m["name"], m.get("protocol", "")) for m in saved.metrics]
    keys += [(m["name"], m.get("protocol", "")) for m in new_metrics if (m["name"], m.get("protocol", "")) not in keys]
    for name, proto in keys:
        old_m = saved.metric(name, proto)
        new_m = new.metric(name, proto) if new is not None and new.status == "done" else None
        out.append(MetricDiff(saved.index, saved.kind, name, proto, _value(old_m), _value(new_m), tolerance))
    for attr, label in COUNTS:
        old_v = getattr(saved, attr)
        new_v = getattr(new, attr) if new is not None and new.status == "done" else None
        if old_v is not None or new_v is not None:
            out.append(MetricDiff(saved.index, saved.kind, label, "count", old_v, new_v, 0.0))
    return out


def compare_sessions(
    saved: Session, new: Session, tolerance: float = DEFAULT_TOLERANCE, from_stage: int = 0
) -> list[MetricDiff]:
    """Metric differences for every stage the saved session finished, from `from_stage` on
    (a stage the replay did not finish shows its metrics as missing)."""
    diffs: list[MetricDiff] = []
    new_by_index = {s.index: s for s in new.stages}
    for st in saved.stages:
        if st.index < from_stage or st.status != "done":
            continue
        diffs += diff_stage(st, new_by_index.get(st.index), tolerance)
    return diffs


def recorded_settings(saved: Session, device: str, dtype: str, overrides: dict) -> dict:
    """The saved run's actual device kind and dtype for a recipe that says "auto" (and no override):
    a CPU session replayed on a GPU machine runs on the CPU in fp32 again, not in bf16 on the GPU.
    A recorded CUDA device this machine lacks stays "auto" (the device note says so)."""
    from frankenlab.evals.devices import DTYPES, cuda_available, device_kind

    env = saved.environment or {}
    pinned = {}
    if overrides.get("dtype", dtype) == "auto" and env.get("dtype") in DTYPES:
        pinned["dtype"] = env["dtype"]
    kind = device_kind(env.get("device"))
    if overrides.get("device", device) == "auto" and kind in ("cpu", "cuda"):
        if kind == "cpu" or cuda_available():
            pinned["device"] = kind
    return pinned


def environment_notes(saved: Session, new: Session) -> list[str]:
    from frankenlab.evals.devices import device_kind

    notes = []
    for key in ENV_KEYS:
        a, b = saved.environment.get(key), new.environment.get(key)
        if key == "device" and device_kind(a) == device_kind(b):  # cuda:0 then, cuda:1 now: the same kind
            continue
        if a != b and (a is not None or b is not None):
            notes.append(f"{key}: saved {a if a is not None else '-'}, now {b if b is not None else '-'}")
    return notes


def weights_note(saved: Session, new: Session) -> str | None:
    a = (saved.model_source.get("weights") or {}).get("digest")
    b = (new.model_source.get("weights") or {}).get("digest")
    if a and b and a != b:
        return (
            f"the model weights differ from the saved session's (sha256 {a[:12]} then, {b[:12]} now): "
            "numbers are expected to change"
        )
    if a and b:
        return f"same model weights (sha256 {a[:12]})"
    return None


def resume_problem(saved: Session, k: int) -> str | None:
    """Why stage k cannot start from the model saved after stage k-1, or None when it can.

    Resuming needs a model folder `pipeline.loading.load_model` opens: a plain one, or a gptq / eora
    stage's quantized folder (with its EoRA manifest); an unmerged LoRA stage saves only its adapter.
    """
    prev = next((s for s in saved.stages if s.index == k - 1), None)
    if prev is None or prev.status != "done":
        return f"stage {k - 1} did not finish in the saved session (status {prev.status if prev else 'missing'})"
    stype = known_kind(prev.kind)
    problem = stype.resume_problem(prev.to_dict()) if stype is not None else None
    if problem:
        return f"stage {k - 1} ({prev.kind}) {problem}"
    if not prev.artifact:
        return f"the run saved no model after stage {k - 1} ({prev.kind}) (it was made without saving models)"
    path = saved.artifact_path(k - 1)
    if path is None:
        p = Path(saved.path).parent / prev.artifact if saved.path else Path(prev.artifact)
        if Path(prev.artifact).is_dir() or p.is_dir():
            return (
                f"the folder saved after stage {k - 1} ({prev.kind}) is not a full model "
                "(e.g. an unmerged LoRA adapter)"
            )
        return f"the model saved after stage {k - 1} ({prev.kind}) is not here (looked for {prev.artifact})"
    from frankenlab.pipeline.quant_folders import describe_folder

    try:
        if describe_folder(path) is not None:  # a gptqmodel folder (+ EoRA manifest): load_model opens it
            return None
    except ValueError as exc:
        return str(exc)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return f"{path / 'config.json'} cannot be read"
    if isinstance(config, dict) and config.get("quantization_config"):
        return f"the model saved after stage {k - 1} ({prev.kind}) is quantized, which a run cannot resume from yet"
    return None


def check_replay_out(saved: Session, out_dir: str | Path) -> None:
    """A replay never writes into its source: `out_dir` equal to or inside the saved session's run
    folder is refused, and so is a folder that already holds another session (never overwritten)."""
    from frankenlab.sessions.session import SESSION_FILE, load_session

    out = Path(out_dir).expanduser().resolve()
    if saved.path:
        source = Path(saved.path).expanduser().resolve().parent
        if out == source or source in out.parents:
            raise SessionError(
                f"--out {out_dir} is the replayed session's own run folder ({source}) or inside it, and a "
                "replay never writes into its source: choose another folder (--out DIR), or leave --out out"
            )
    existing = out / SESSION_FILE
    if existing.is_file() or existing.is_symlink():
        try:
            live = load_session(existing).status == "running"  # a live run: its lock refuses, with its owner
        except SessionError:
            live = False
        if not live:
            raise SessionError(
                f"{out_dir} already holds a session, which a replay does not overwrite: choose another "
                "folder (--out DIR), or leave --out out"
            )


def replay(
    saved: Session,
    out_dir: str | Path,
    *,
    from_stage: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    data_dir: str | Path | None = None,
    listener: Callable | None = None,
    cancel=None,
    save_models: bool = True,
    on_diff: Callable[[MetricDiff], None] | None = None,
) -> ReplayResult:
    """Re-run `saved`'s recipe into `out_dir` and compare; raises SessionError when it cannot start.

    `model`, `device`, `dtype` override the recipe's (e.g. the model lives elsewhere on this machine).
    `listener` gets the runner's events; `on_diff` gets each metric's comparison as soon as it is
    measured (a TUI can fill its table live). The new session records `replay_of`.
    """
    from frankenlab.evals.errors import ModelLoadError, RecipeError
    from frankenlab.pipeline.events import MetricMeasured, ignore
    from frankenlab.pipeline.loading import load_model
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions.recorder import record_run

    if tolerance < 0:
        raise SessionError(f"tolerance must be 0 or more, got {tolerance}")
    check_replay_out(saved, out_dir)
    try:
        recipe = Recipe.from_dict(saved.recipe)
    except RecipeError as exc:
        raise SessionError(f"the session's recipe cannot be run by this frankenlab: {exc}") from None
    overrides = {k: v for k, v in (("source", model), ("device", device), ("dtype", dtype)) if v}
    overrides.update(recorded_settings(saved, recipe.model.device, recipe.model.dtype, overrides))
    if overrides:
        try:
            recipe.model = dc_replace(recipe.model, **overrides)
        except RecipeError as exc:
            raise SessionError(str(exc)) from None
    n = len(recipe.stages)
    if not 1 <= from_stage <= max(n, 1):
        raise SessionError(f"--from-stage must be between 1 and {n} (the recipe has {n} stages), got {from_stage}")
    loaded = None
    if from_stage > 1:
        problem = resume_problem(saved, from_stage)
        if problem:
            ok = next((k for k in range(from_stage - 1, 1, -1) if resume_problem(saved, k) is None), 1)
            raise SessionError(
                f"cannot resume from stage {from_stage}: {problem}; replay with --from-stage {ok} "
                + ("(from the start) " if ok == 1 else "")
                + "instead"
            )
        artifact = saved.artifact_path(from_stage - 1)
        try:
            loaded = load_model(
                str(artifact),
                device=recipe.model.device,
                dtype=recipe.model.dtype,
                trust_remote_code=recipe.model.trust_remote_code,
            )
        except ModelLoadError as exc:
            raise SessionError(f"cannot load the model saved after stage {from_stage - 1}: {exc}") from None

    by_index = {s.index: s for s in saved.stages}
    forward = listener or ignore

    def watch(event) -> None:
        forward(event)
        if on_diff and isinstance(event, MetricMeasured) and event.step is None and event.stage >= 0:
            st = by_index.get(event.stage)
            old = st.metric(event.name, event.protocol) if st is not None else None
            try:
                on_diff(
                    MetricDiff(
                        event.stage,
                        st.kind if st else "",
                        event.name,
                        event.protocol,
                        _value(old),
                        float(event.value),
                        tolerance,
                    )
                )
            except Exception:  # noqa: BLE001 - a broken callback must not stop the run
                pass

    from frankenlab.pipeline.lora_progress import carry_checkpoints

    # a stage killed or cancelled after a checkpoint (LoRA) continues from it, in the replay's own folder
    carried = carry_checkpoints(Path(saved.path).parent if saved.path else None, out_dir, from_stage)
    new = record_run(
        recipe,
        out_dir,
        listener=watch,
        cancel=cancel,
        loaded=loaded,
        save_models=save_models,
        data_dir=data_dir,
        start_stage=from_stage,
    )
    if from_stage > 1:  # the new session is complete: earlier stages are the saved records
        for i, st in enumerate(new.stages):
            if st.index < from_stage and st.index in by_index:
                copy = StageRecord.from_dict(by_index[st.index].to_dict())
                copy.reused_from = saved.id
                found = saved.artifact_path(st.index) if copy.artifact else None
                if found is not None:  # where the model is now (the saved run folder may have moved)
                    copy.artifact = str(found.resolve())
                new.stages[i] = copy
    new.replay_of = {"session_id": saved.id, "path": saved.path, "from_stage": from_stage}
    if new.path:
        new.save(new.path)
    notes = environment_notes(saved, new) + carried
    if from_stage == 1:
        w = weights_note(saved, new)
        if w:
            notes.append(w)
    if new.status != "done":
        notes.append(f"the replay ended {new.status}: metrics of unfinished stages are reported missing")
    diffs = compare_sessions(saved, new, tolerance, from_stage if from_stage > 1 else 0)
    return ReplayResult(saved, new, diffs, from_stage, tolerance, notes)
