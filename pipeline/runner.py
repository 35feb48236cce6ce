"""Run a recipe: load, evaluate the baseline, then each stage followed by its evaluation.

Everything the runner learns goes to one listener as events and into the session record, which is
saved atomically after every stage. Cancellation is cooperative (a threading.Event checked between
batches); a cancelled or failed run still leaves a valid session with all finished stages.
"""
from __future__ import annotations

import json
import platform
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from evals.data import DataNotFound, load_dataset_records
from evals.perplexity import Cancelled, Protocol
from evals.suite import evaluate
from sessions.record import Session, StageRecord

from .config import RecipeError
from .context import StageContext
from .events import (Event, Listener, LogLine, MetricMeasured, RunFailed, RunFinished, StageFinished,
                     StageStarted, ignore)
from .models import LoadedModel, ModelLoadError, count_parameters, decoder_layers, load_model, resolve_source
from .recipe import Recipe, StageSpec

CALIBRATED_STAGES = {"width", "depth", "gptq", "eora"}


@dataclass
class RunOptions:
    out_dir: Path
    save_models: bool = True
    data_dir: Path | None = None
    listener: Listener = ignore
    cancel: threading.Event | None = None
    start_stage: int = 1  # 1-based index of the first recipe stage to run (replay --from-stage)


def environment(loaded: LoadedModel | None, recipe: Recipe) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "seed": recipe.calibration.seed,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    for pkg in ("peft", "gptqmodel", "datasets"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - optional packages
            env[pkg] = None
    if loaded is not None:
        env["device"] = str(loaded.device)
        env["dtype"] = str(loaded.dtype).replace("torch.", "")
        if loaded.device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(loaded.device)
    return env


def preflight(recipe: Recipe, data_dir: Path | None) -> None:
    """Fail before any heavy work when data the run will need cannot be found."""
    needed = set()
    if recipe.evaluation.after != "none":
        for p in recipe.evaluation.perplexity:
            proto = Protocol.parse(p)
            needed.add(("file", proto.data) if Path(proto.data).suffix else (proto.data, None))
        if recipe.evaluation.triviaqa_closed:
            needed.add(("triviaqa", None))
        if recipe.evaluation.triviaqa_open:
            needed.add((recipe.evaluation.open_book, None))
    if any(s.kind in CALIBRATED_STAGES for s in recipe.stages):
        ds = recipe.calibration.dataset
        needed.add(("file", ds) if Path(ds).suffix else (ds, None))
    for name, path in sorted(needed, key=str):
        load_dataset_records(name, path=path, data_dir=data_dir, limit=1)


def model_depth(source_ref: str) -> int | None:
    """Number of decoder layers from config.json, without loading weights."""
    try:
        src = resolve_source(source_ref)
        cfg = json.loads((Path(src.path) / "config.json").read_text())
        return int(cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers"))
    except (ModelLoadError, OSError, ValueError, TypeError):
        return None


class Runner:
    def __init__(self, recipe: Recipe, options: RunOptions, loaded: LoadedModel | None = None):
        self.recipe = recipe
        self.opt = options
        self.loaded = loaded
        self.cancel = options.cancel or threading.Event()
        self.out = Path(options.out_dir)
        self.session = Session(recipe=recipe.to_dict())
        self.session_path = self.out / "session.json"
        self.models: dict[int, torch.nn.Module] = {}  # kept only for the last stage (chat, memory)

    # -- events ----------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        if not type(event).__name__ == "Progress":
            self.session.events.append(event.to_dict())
        try:
            self.opt.listener(event)
        except Exception:  # noqa: BLE001 - a broken listener must not kill the run
            pass

    def save(self) -> None:
        self.session.save(self.session_path)

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> Session:
        self.out.mkdir(parents=True, exist_ok=True)
        rec = self.recipe
        self.session.model_source = {"ref": rec.model.source}
        self.session.stages = [StageRecord(0, "baseline", "baseline")] + [
            StageRecord(i, s.kind, s.label, s.params()) for i, s in enumerate(rec.stages, 1)]
        for st in self.session.stages[1:self.opt.start_stage]:
            st.status = "skipped"  # resuming (replay --from-stage): earlier stages are not run again
        remaining = replace(rec, stages=rec.stages[self.opt.start_stage - 1:])  # what depth checks apply to
        (self.out / "recipe.toml").write_text(rec.dumps())
        self.save()
        index = -1
        try:
            preflight(rec, self.opt.data_dir)
            if self.loaded is None:
                depth = model_depth(rec.model.source)
                if depth is not None:
                    remaining.check_for(depth)
                self.emit(LogLine(-1, f"loading model {rec.model.source!r}"))
                self.loaded = load_model(rec.model.source, device=rec.model.device, dtype=rec.model.dtype,
                                         trust_remote_code=rec.model.trust_remote_code)
            lm = self.loaded
            remaining.check_for(len(decoder_layers(lm.model)))
            self.session.model_source = {"ref": rec.model.source, **lm.source.to_dict()}
            self.session.model_source["weights"] = self._weights_digest(lm.source.path)
            self.session.environment = environment(lm, rec)
            self.emit(LogLine(-1, f"loaded {lm.source.name} ({count_parameters(lm.model):,} params) "
                                  f"on {lm.device} as {str(lm.dtype).replace('torch.', '')} in {lm.load_seconds:.1f}s"))
            model = lm.model
            ctx = StageContext(lm.tokenizer, lm.device, rec.calibration, self.opt.data_dir, listener=self.emit,
                               cancel_event=self.cancel)
            index = 0
            self._baseline(model, ctx)
            for index, spec in enumerate(rec.stages, 1):
                if index < self.opt.start_stage:
                    continue
                model = self._stage(index, spec, model, ctx)
            self.session.status = "done"
        except (Cancelled, KeyboardInterrupt):
            self._close(index, "cancelled", "cancelled by the user; finished stages are kept")
        except (RecipeError, DataNotFound, ModelLoadError) as exc:
            self._close(index, "failed", str(exc))
        except torch.OutOfMemoryError:
            self._close(index, "failed", "out of memory: lower the batch size or calibration samples, "
                                         "or run on a device with more memory; finished stages are kept")
        except Exception as exc:  # noqa: BLE001 - any stage failure is reported, the session kept
            self.emit(LogLine(index, traceback.format_exc(), "error"))
            self._close(index, "failed", f"{type(exc).__name__}: {exc}")
        self.save()
        self.emit(RunFinished(index, self.session.status, str(self.session_path)))
        return self.session

    def _weights_digest(self, path: str | None) -> dict | None:
        """sha256 of the weight files (cached per file), so a replay can tell it ran on the same model."""
        from sessions.hashing import weights_digest

        try:
            return weights_digest(path)
        except OSError as exc:
            self.emit(LogLine(-1, f"could not hash the model weights ({exc}); the session records none", "warning"))
            return None

    def _close(self, index: int, status: str, message: str) -> None:
        # a failure before the baseline (data, model, recipe checks) is recorded on the baseline row
        index = max(index, 0)
        self.session.status = status
        for st in self.session.stages:
            if st.status == "running" or (st.index == index and st.status == "pending"):
                st.status, st.error = status, message
            elif st.status == "pending":
                st.status = "skipped"
        self.emit(RunFailed(index, message, status))

    def _measure(self, st: StageRecord, model, ctx: StageContext, final: bool) -> None:
        st.params_count = count_parameters(model)
        st.params_nonzero = count_parameters(model, nonzero=True)
        st.num_layers = len(decoder_layers(model)) if hasattr(getattr(model, "model", None), "layers") else None
        try:
            from .memory import footprint_summary  # lands with the memory-accounting work

            st.footprint = footprint_summary(model)
        except ImportError:
            pass
        when = self.recipe.evaluation.after
        if when == "none" or (when == "last" and not final and st.index != 0):
            return
        result = evaluate(model, ctx.tokenizer, self.recipe.evaluation, data_dir=self.opt.data_dir,
                          progress=lambda f, msg: ctx.progress(f, msg), cancelled=lambda: ctx.cancelled,
                          on_metric=lambda m: self.emit(MetricMeasured(st.index, m["name"], m["value"],
                                                                       m.get("protocol", ""))))
        st.metrics, st.details = result.metrics, result.details

    def _baseline(self, model, ctx: StageContext) -> None:
        st = self.session.stages[0]
        if self.opt.start_stage > 1:
            st.status = "skipped"
            return
        t0 = time.perf_counter()
        st.status = "running"
        self.emit(StageStarted(0, "baseline", {}))
        ctx.index = 0
        self._measure(st, model, ctx, final=not self.recipe.stages)
        st.status, st.seconds = "done", time.perf_counter() - t0
        self.emit(StageFinished(0, "baseline", "done", st.seconds, summary(st)))
        self.save()

    def _stage(self, index: int, spec: StageSpec, model, ctx: StageContext):
        st = self.session.stages[index]
        st.status = "running"
        self.save()
        self.emit(StageStarted(index, spec.kind, spec.params()))
        ctx.index = index
        ctx.work_dir = self.out / "stages" / f"{index:02d}-{spec.kind}"
        t0 = time.perf_counter()
        module = __import__(f"pipeline.stages.{spec.kind}", fromlist=["run"])
        result = module.run(model, ctx, spec.config)
        model = result.model
        st.report = result.report
        stage_seconds = time.perf_counter() - t0
        if self.opt.save_models:
            st.artifact = result.artifacts.get("model") or str(self._save_model(model, ctx, spec, index))
        self._measure(st, model, ctx, final=index == len(self.recipe.stages))
        st.status, st.seconds = "done", time.perf_counter() - t0
        st.report.setdefault("stage_seconds", stage_seconds)
        self.emit(StageFinished(index, spec.kind, "done", st.seconds, summary(st)))
        self.save()
        return model

    def _save_model(self, model, ctx: StageContext, spec: StageSpec, index: int) -> Path:
        d = ctx.work_dir
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d)
        ctx.tokenizer.save_pretrained(d)
        done = [s for s in self.recipe.stages[:index]]
        partial = Recipe(self.recipe.name, self.recipe.description, self.recipe.model, self.recipe.calibration,
                         self.recipe.evaluation, done)
        (d / "frankenlab-recipe.toml").write_text(partial.dumps())
        (d / "README.md").write_text(
            f"# {self.recipe.name}: after stage {index} ({spec.kind})\n\nMade by frankenlab from "
            f"`{self.recipe.model.source}` with the stages in `frankenlab-recipe.toml`.\n"
            f"Loads with `AutoModelForCausalLM.from_pretrained(\"{d}\")`.\n")
        return d


def summary(st: StageRecord) -> dict:
    out = {"params": st.params_count, "params_nonzero": st.params_nonzero, "layers": st.num_layers}
    for m in st.metrics:
        out[f"{m['name']}[{m.get('protocol', '')}]"] = m["value"]
    return out


def run_recipe(recipe: Recipe, out_dir: str | Path, *, listener: Listener = ignore,
               cancel: threading.Event | None = None, loaded: LoadedModel | None = None,
               save_models: bool = True, data_dir: str | Path | None = None, start_stage: int = 1) -> Session:
    """Run `recipe` and return its session (also saved as out_dir/session.json)."""
    opts = RunOptions(Path(out_dir), save_models, Path(data_dir) if data_dir else None, listener, cancel, start_stage)
    return Runner(recipe, opts, loaded).run()
