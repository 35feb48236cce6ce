"""Run a recipe: load, evaluate the baseline, then each stage followed by its evaluation.

The runner only acts and tells: everything it learns goes to its listeners as events
(`pipeline.events`), and `StageFinished` carries the stage record (`pipeline.records.StageRecord`,
built here). It never writes the session: `sessions.recorder.SessionRecorder` is the listener that
builds it and saves it after every stage (the CLI, the lab and sweeps attach one). It writes the
run's artifacts: recipe.toml (atomically) and each stage's model under OUT/stages/NN-kind.
Cancellation is cooperative (a threading.Event checked between batches); a cancelled run ends
with `RunCancelled`, a failed one with `RunFailed`, and both still report every finished stage.
What a stage kind needs (calibration, layers after it) is asked of the stage registry; the checks
before any weights load, the environment record and write errors' messages are `pipeline.preflight`'s.
"""

from __future__ import annotations

import shutil
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.data import DataNotFound
from frankenlab.evals.devices import free_cached_memory
from frankenlab.evals.errors import DataError, ModelLoadError, RecipeError
from frankenlab.evals.suite import evaluate
from frankenlab.pipeline.atomic import atomic_write_text, guarded_path
from frankenlab.pipeline.child_stage import StageProcessFailed, run_stage
from frankenlab.pipeline.context import StageContext
from frankenlab.pipeline.events import (
    Event,
    Listener,
    LogLine,
    MetricMeasured,
    ModelReady,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunStarted,
    StageFinished,
    StageStarted,
)
from frankenlab.pipeline.footprint import footprint_summary
from frankenlab.pipeline.loading import LoadedModel, count_parameters, decoder_layers, load_model
from frankenlab.pipeline.preflight import check_sizes, config_depth, environment, model_config, preflight, write_problem
from frankenlab.pipeline.provenance import describe_zeros, weights_origin
from frankenlab.pipeline.recipe import Recipe, StageSpec
from frankenlab.pipeline.records import StageRecord
from frankenlab.pipeline.runlock import RunLock
from frankenlab.pipeline.stages import stage_kind


@dataclass
class RunOptions:
    out_dir: Path
    save_models: bool = True
    data_dir: Path | None = None
    listeners: tuple = ()  # each gets every event, in order
    cancel: threading.Event | None = None
    start_stage: int = 1  # 1-based index of the first recipe stage to run (replay --from-stage)
    baseline: bool = True  # evaluate the model as loaded first (a sweep measures it once, in its own job)


@dataclass
class RunResult:
    """How the run ended; the session (if a recorder listened) holds the rest."""

    status: str  # done | failed | cancelled
    out_dir: Path
    message: str = ""
    model: torch.nn.Module | None = None  # the last finished stage's model (chat, memory)
    records: list[StageRecord] = field(default_factory=list)  # every StageFinished record, in order


class Runner:
    def __init__(self, recipe: Recipe, options: RunOptions, loaded: LoadedModel | None = None):
        self.recipe = recipe
        self.opt = options
        self.loaded = loaded
        self.cancel = options.cancel or threading.Event()
        self.out = Path(options.out_dir)
        self.records: list[StageRecord] = []
        self.listener_errors: list[str] = []

    # -- events ----------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        for listener in self.opt.listeners:
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - a broken listener must not kill the run
                self.listener_errors.append(f"{type(exc).__name__}: {exc}")

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> RunResult:
        rec = self.recipe
        first = self.opt.start_stage
        planned = [{"index": 0, "kind": "baseline", "name": "baseline", "params": {}}] + [
            {"index": i, "kind": s.kind, "name": s.label, "params": s.params()} for i, s in enumerate(rec.stages, 1)
        ]
        lock, lock_error, took_over = RunLock(self.out), None, None
        try:  # a live run in this folder refuses (RunFolderBusy) before anything is written
            took_over = lock.acquire()
        except OSError as exc:  # e.g. a read-only parent: reported as the run's failure below
            lock_error = exc
        self.emit(RunStarted(-1, rec.to_dict(), str(self.out), planned, first))
        remaining = replace(rec, stages=rec.stages[first - 1 :])  # what depth checks apply to
        index, status, message, model, cause = -1, "done", "", None, ""
        try:
            if lock_error is not None:
                raise lock_error
            if took_over:
                self.emit(LogLine(-1, took_over, "warning"))
            self._write_recipe()
            for warning in preflight(rec, self.opt.data_dir):
                self.emit(LogLine(-1, warning, "warning"))
            if self.loaded is None:
                cfg = model_config(rec.model.source)  # read once: depth and widths, before loading
                depth = config_depth(cfg)
                if depth is not None:
                    self._check_depth(remaining, depth, first)
                self._check_config(remaining, cfg, first)
                self.emit(LogLine(-1, f"loading model {rec.model.source!r}"))
                self.loaded = load_model(
                    rec.model.source,
                    device=rec.model.device,
                    dtype=rec.model.dtype,
                    trust_remote_code=rec.model.trust_remote_code,
                )
            lm = self.loaded
            self._check_depth(remaining, len(decoder_layers(lm.model)), first)
            self._check_config(remaining, lm.model.config.to_dict(), first)  # before the baseline evaluation
            source_info = {"ref": rec.model.source, **lm.source.to_dict()}
            origin = weights_origin(source_info)
            if origin:  # e.g. the bundled Q4_1 GGUF: a quantization stage's cost on it is understated
                source_info["weights_origin"] = origin
            self.emit(ModelReady(-1, source_info, environment(lm, rec)))
            self.emit(
                LogLine(
                    -1,
                    f"loaded {lm.source.name} ({count_parameters(lm.model):,} params) "
                    f"on {lm.device} as {str(lm.dtype).replace('torch.', '')} in {lm.load_seconds:.1f}s",
                )
            )
            model = lm.model
            run_ctx = StageContext(
                lm.tokenizer,
                lm.device,
                rec.calibration,
                self.opt.data_dir,
                listener=self.emit,
                cancel_event=self.cancel,
                source_model={
                    "source": rec.model.source,
                    "device": rec.model.device,
                    "dtype": rec.model.dtype,
                    "trust_remote_code": rec.model.trust_remote_code,
                },
            )
            index = 0
            if first == 1 and self.opt.baseline:
                self._baseline(model, run_ctx.for_stage(0))
            source = Path(lm.source.path) if lm.source.path else None
            for index, spec in enumerate(rec.stages, 1):
                if index < first:
                    continue
                model, source = self._stage(index, spec, model, run_ctx, source)
        except (Cancelled, KeyboardInterrupt):
            status = "cancelled"
            who = "SIGTERM" if getattr(self.cancel, "reason", None) == "SIGTERM" else "the user"
            message = (
                f"cancelled by {who}; finished stages are kept"
                if self.records
                else f"cancelled by {who}; no stage had finished"
            )
        except (RecipeError, DataNotFound, DataError, ModelLoadError) as exc:
            status, message, cause = "failed", str(exc), "input"
            index = getattr(exc, "stage", None) or index  # a stage's refusal is that stage's row
        except torch.OutOfMemoryError as exc:  # a stage's own one line ("out of ...: lower ...") when it has one
            said = str(exc)
            status, message = (
                "failed",
                (
                    f"{said}; finished stages are kept"
                    if said.startswith("out of ") and ": lower " in said
                    else "out of memory: lower the batch size or calibration samples, "
                    "or run on a device with more memory; finished stages are kept"
                ),
            )
        except OSError as exc:  # a full disk, a read-only folder: the user can fix it, no traceback
            status, message, cause = "failed", write_problem(exc, self.out), "input"
        except StageProcessFailed as exc:  # a stage's worker process failed: one line that names its log
            status, message = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - any stage failure is reported, finished stages kept
            self.emit(LogLine(index, traceback.format_exc(), "error"))
            status, message = "failed", f"{type(exc).__name__}: {exc}"
        # a failure before the baseline (data, model, recipe checks) belongs to the baseline row
        # a refused stage owns its refusal: the stage that was about to run, not the baseline
        if status == "cancelled":
            self.emit(RunCancelled(max(index, 0), message))
        elif status != "done":
            self.emit(RunFailed(max(index, 0), message, cause=cause))
        lock.release()
        self.emit(RunFinished(max(index, 0), status, str(self.out)))
        return RunResult(status, self.out, message, model if status == "done" else None, self.records)

    def _check_config(self, remaining: Recipe, config: dict | None, first: int) -> None:
        if not config:
            return
        check_sizes(remaining, config)  # sequence lengths the model cannot take
        try:
            remaining.check_config(config)
        except RecipeError as exc:
            if getattr(exc, "stage", None):
                exc.stage += first - 1  # the index in the whole recipe
            raise

    def _check_depth(self, remaining: Recipe, depth: int, first: int) -> None:
        try:
            remaining.check_for(depth)
        except RecipeError as exc:
            if getattr(exc, "stage", None):
                exc.stage += first - 1  # the index in the whole recipe
            raise

    def _write_recipe(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "recipe.toml", self.recipe.dumps())
        except OSError as exc:
            raise RecipeError(write_problem(exc, self.out)) from None

    def _measure(self, record: StageRecord, model, ctx: StageContext, final: bool) -> None:
        record.params_count = count_parameters(model)
        record.params_nonzero = count_parameters(model, nonzero=True)
        record.num_layers = len(decoder_layers(model)) if hasattr(getattr(model, "model", None), "layers") else None
        record.footprint = footprint_summary(model)
        when = self.recipe.evaluation.after
        if when == "none" or (when == "last" and not final and record.index != 0):
            return
        result = evaluate(
            model,
            ctx.tokenizer,
            self.recipe.evaluation,
            data_dir=self.opt.data_dir,
            progress=lambda f, msg: ctx.progress(f, msg),
            cancelled=lambda: ctx.cancelled,
            on_metric=lambda m: self.emit(MetricMeasured(record.index, m["name"], m["value"], m.get("protocol", ""))),
        )
        record.metrics, record.details = result.metrics, result.details

    def _finish(self, record: StageRecord, t0: float) -> None:
        record.status, record.seconds = "done", time.perf_counter() - t0
        self.records.append(record)
        free_cached_memory(self.loaded.device if self.loaded is not None else None)  # CUDA only: a no-op on CPU
        self.emit(StageFinished(record))

    def _baseline(self, model, ctx: StageContext) -> None:
        t0 = time.perf_counter()
        self.emit(StageStarted(0, "baseline", {}))
        record = StageRecord(0, "baseline", "baseline", {}, status="running")
        self._measure(record, model, ctx, final=not self.recipe.stages)
        # densities of later stages are relative to these: a dequantized GGUF already holds exact zeros
        record.report["input_zeros"] = record.params_count - record.params_nonzero
        record.report["input_density"] = record.params_nonzero / max(1, record.params_count)
        origin = weights_origin(self.loaded.source.to_dict()) if self.loaded is not None else None
        if origin:
            record.report["weights_origin"] = origin["note"]
            ctx.log(f"baseline: {origin['note']}; {describe_zeros(record.params_count, record.params_nonzero)}")
        self._finish(record, t0)

    def _stage(self, index: int, spec: StageSpec, model, run_ctx: StageContext, source: Path | None):
        """Run stage `index` on `model` (whose saved folder is `source`, if any); returns the new
        model and its saved folder."""
        self.emit(StageStarted(index, spec.kind, spec.params()))
        ctx = run_ctx.for_stage(index, self.out / "stages" / f"{index:02d}-{spec.kind}", source)
        t0 = time.perf_counter()
        result = run_stage(stage_kind(spec.kind), model, ctx, spec.config)  # RUNS_IN_CHILD: in a worker process
        model = result.model
        record = StageRecord(index, spec.kind, spec.label, spec.params(), status="running", report=result.report)
        stage_seconds = time.perf_counter() - t0
        saved = None
        if self.opt.save_models:
            saved = Path(result.artifacts.get("model") or self._save_model(model, ctx, spec, index))
            record.artifact = str(saved)
        self._measure(record, model, ctx, final=index == len(self.recipe.stages))
        record.report.setdefault("stage_seconds", stage_seconds)
        self._finish(record, t0)
        return model, saved

    def _save_model(self, model, ctx: StageContext, spec: StageSpec, index: int) -> Path:
        d = guarded_path(self.out, "stages", ctx.work_dir.name)  # no linked stages/ folder is written through
        d.mkdir(parents=True, exist_ok=True)
        try:
            model.save_pretrained(d)
            ctx.tokenizer.save_pretrained(d)
            partial = replace(self.recipe, stages=self.recipe.stages[:index])
            atomic_write_text(d / "frankenlab-recipe.toml", partial.dumps())
            atomic_write_text(
                d / "README.md",
                f"# {self.recipe.name}: after stage {index} ({spec.kind})\n\nMade by frankenlab from "
                f"`{self.recipe.model.source}` with the stages in `frankenlab-recipe.toml`.\n"
                f'Loads with `AutoModelForCausalLM.from_pretrained("{d}")`.\n',
            )
        except BaseException:  # a full disk, a cancel: no half-written stage folder is left behind
            shutil.rmtree(d, ignore_errors=True)
            raise
        return d


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    listener: Listener | None = None,
    listeners: Iterable[Listener] = (),
    cancel: threading.Event | None = None,
    loaded: LoadedModel | None = None,
    save_models: bool = True,
    data_dir: str | Path | None = None,
    start_stage: int = 1,
    baseline: bool = True,
) -> RunResult:
    """Run `recipe`, telling `listener` (and `listeners`) everything; artifacts go to out_dir.

    Nothing records a session unless a recorder listens: `sessions.record_run` is this function
    with a `SessionRecorder` attached, returning the session."""
    every = tuple(listeners) + ((listener,) if listener is not None else ())
    opts = RunOptions(
        Path(out_dir), save_models, Path(data_dir) if data_dir else None, every, cancel, start_stage, baseline
    )
    return Runner(recipe, opts, loaded).run()
