"""Stages in a worker process: a library that exits or aborts the process takes only the worker down.

gptqmodel's worker threads call `os._exit(1)` on any exception, and after a cancel inside its layer
loop the interpreter can abort at exit. A stage module that sets `RUNS_IN_CHILD = True` (gptq, eora;
asked through the registry, `pipeline.stages`) therefore runs here: `run_stage` starts
`python -m frankenlab.pipeline.child_stage`, which loads the model the stage receives from its saved
folder (`ctx.input_artifact`: the previous stage's folder, or the folder the run's model came from),
runs the stage into its own folder and exits. The parent then loads the model from the folder the
stage wrote, so the runner evaluates what was saved, exactly as in-process.

- Input: the saved folder when there is one that opens as the model in memory; otherwise (runs with
  `--no-save-models`, an unmerged LoRA adapter) the parent saves the model with `save_pretrained`
  (safetensors, never a pickle) into a hidden folder beside the stage folder, removed afterwards. An
  unmerged adapter is merged first with its pruning mask kept, as the gptq stage itself would.
- Voice: the child's `ctx.progress`, `ctx.log` and `ctx.metric` come back as JSON lines on its
  stdout and are replayed on the parent's context, so the lab, the CLI's bars, the session and Ray
  nodes see them as before. Everything else the child prints (gptqmodel's banner, tracebacks) goes
  to its log, `stages/NN-kind.log` beside the stage folder.
- Cancel: the parent writes `cancel` to the child's stdin; the child's `ctx.check_cancel()` sees it
  (a closed stdin, the parent gone, counts as a cancel too). A child that does not stop within
  `CANCEL_GRACE_S` is ended. (The process and its JSON-lines protocol: `pipeline.worker_process`,
  shared with the sweep's per-GPU jobs.) The half-written stage folder is removed and the run ends cancelled.
- Failure: the run fails with one line naming the reason (the child's exception, or the last
  exception in its log when it died without a word) and its log. A RecipeError, missing data or an
  unloadable model in the child is the same input error as in-process.

The overhead is one model load in the child and one in the parent plus the child's imports
(`benchmarks/bench_child_stage.py`; docs/benchmarks.md).
"""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import types
from pathlib import Path

import torch

from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.context import StageContext, StageResult
from frankenlab.pipeline.worker_process import child_channel, child_exit, supervise

CANCEL_GRACE_S = 5.0  # how long a child may take to honour a cancel before it is ended


class StageProcessFailed(RuntimeError):
    """A stage's worker process failed; the message is one line naming the reason and the worker's log."""


def run_stage(stage, model, ctx: StageContext, config) -> StageResult:
    """Run `stage` (a `pipeline.stages.StageType`) in-process, or in a worker process when its module
    asks for it (`RUNS_IN_CHILD`)."""
    if not stage.runs_in_child:
        return stage.run(model, ctx, config)
    return run_in_child(stage, model, ctx, config)


# -- the parent ------------------------------------------------------------------------------------
def log_path(work_dir: Path) -> Path:
    """The worker's log: beside the stage folder, so it outlives a removed half-written folder."""
    return Path(work_dir).parent / f"{Path(work_dir).name}.log"


def run_in_child(stage, model, ctx: StageContext, config) -> StageResult:
    from frankenlab.evals.config import to_dict

    if ctx.work_dir is None:
        raise RecipeError(f"the {stage.name} stage needs a work folder (run it through the runner)")
    work = Path(ctx.work_dir)
    work.parent.mkdir(parents=True, exist_ok=True)
    log = log_path(work)
    dtype = _model_dtype(model)
    spare = work.parent / f".{work.name}.input"  # the model saved for the child, when no folder holds it
    job = {
        "kind": stage.name,
        "module": _module_name(stage),
        "params": config.to_dict() if hasattr(config, "to_dict") else to_dict(config),
        "calibration": to_dict(ctx.calibration),
        "data_dir": str(ctx.data_dir) if ctx.data_dir else None,
        "work_dir": str(work),
        "index": ctx.index,
        "device": str(ctx.device),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "sys_path": list(sys.path),
        "input": _hand_over(model, ctx, spare),
    }
    done = False
    try:
        outcome = _supervise(job, ctx, log)
        if outcome.get("event") == "result":
            result = _load_result(stage.name, outcome, ctx, dtype, log)
            done = True
            return result
        raise _failure(stage.name, outcome, log)
    finally:
        shutil.rmtree(spare, ignore_errors=True)
        if not done:  # a half-written stage folder is not an artifact
            shutil.rmtree(work, ignore_errors=True)


def _module_name(stage) -> str:
    module = stage.load()
    if isinstance(stage.target, str):
        return stage.target
    if isinstance(module, types.ModuleType):
        return module.__name__
    raise RecipeError(f"stage {stage.name!r} asks to run in a worker process but is not an importable module")


def _model_dtype(model) -> str:
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dt).replace("torch.", "")


def _opens(folder: Path | None) -> bool:
    from frankenlab.pipeline.quant_folders import describe_folder

    if folder is None or not Path(folder).is_dir():
        return False
    try:
        return (Path(folder) / "config.json").is_file() or describe_folder(folder) is not None
    except ValueError:
        return False


def _hand_over(model, ctx: StageContext, spare: Path) -> dict:
    """How the child gets the model: the saved folder it came from, or a folder saved for it
    (safetensors through `save_pretrained`; an unmerged adapter merged first, its mask kept)."""
    from frankenlab.pipeline.lora_adapters import is_peft, merge_keeping_mask

    if _opens(ctx.input_artifact) and not is_peft(model):  # an unmerged adapter: not the folder
        return {"folder": str(ctx.input_artifact)}
    shutil.rmtree(spare, ignore_errors=True)
    spare.mkdir(parents=True)
    if is_peft(model):
        model, remasked = merge_keeping_mask(model)
        ctx.log(f"unmerged LoRA adapter merged before the worker starts (mask re-applied on {remasked} matrices)")
    model.save_pretrained(spare)
    ctx.tokenizer.save_pretrained(spare)
    return {"folder": str(spare), "spare": True}  # spare: removed afterwards, not the stage's input artifact


def _supervise(job: dict, ctx: StageContext, log: Path) -> dict:
    """Start the child, replay its voice on `ctx`, pass on a cancel; returns its last word
    ({"event": "result" | "error" | "cancelled" | "died", ...}) with "returncode" and "asked_cancel"."""
    last: dict = {"event": "died"}

    def on_message(msg: dict) -> None:
        nonlocal last
        if msg.get("event") in ("progress", "log", "metric"):
            _replay(msg, ctx)
        elif msg.get("event") in ("result", "error", "cancelled"):
            last = msg

    header = f"frankenlab worker for stage {job['index']} ({job['kind']})"
    returncode, asked, _pid = supervise(
        "frankenlab.pipeline.child_stage", job, log, header, on_message, lambda: ctx.cancelled, grace=CANCEL_GRACE_S
    )
    return {**last, "returncode": returncode, "asked_cancel": asked}


def _replay(msg: dict, ctx: StageContext) -> None:
    kind = msg["event"]
    if kind == "progress":
        ctx.progress(float(msg.get("fraction", 0.0)), str(msg.get("message", "")))
    elif kind == "log":
        ctx.log(str(msg.get("message", "")), str(msg.get("level", "info")))
    else:
        ctx.metric(str(msg["name"]), float(msg["value"]), str(msg.get("protocol", "")), msg.get("step"))


def _load_result(kind: str, outcome: dict, ctx: StageContext, dtype: str, log: Path) -> StageResult:
    from frankenlab.evals.errors import ModelLoadError
    from frankenlab.pipeline.loading import load_model

    artifacts = dict(outcome.get("artifacts") or {})
    try:
        loaded = load_model(artifacts["model"], device=str(ctx.device), dtype=dtype)
    except ModelLoadError as exc:
        raise StageProcessFailed(
            f"{kind} stage: the model its worker saved does not open: {exc} (log: {log})"
        ) from None
    if outcome.get("returncode"):
        ctx.log(f"{kind}: its worker process exited with code {outcome['returncode']} after finishing", "warning")
    return StageResult(loaded.model, dict(outcome.get("report") or {}), artifacts)


INPUT_ERRORS = ("RecipeError", "DataNotFound", "DataError", "ModelLoadError")


def _failure(kind: str, outcome: dict, log: Path) -> BaseException:
    """The exception the runner sees for a child that did not finish."""
    if outcome["asked_cancel"] or outcome.get("event") == "cancelled":
        return Cancelled("cancelled by the user")
    if outcome.get("event") == "error":
        name, message = outcome.get("type", "Error"), outcome.get("message", "")
        if name in INPUT_ERRORS:  # the user's to fix, as when the stage runs in-process
            from frankenlab.evals.data import DataNotFound
            from frankenlab.evals.errors import DataError, ModelLoadError

            kinds = {"RecipeError": RecipeError, "DataNotFound": DataNotFound, "DataError": DataError}
            return {**kinds, "ModelLoadError": ModelLoadError}[name](message)
        if name == "OutOfMemoryError" or (name == "RuntimeError" and "out of memory" in message.lower()):
            return torch.OutOfMemoryError(oom_line(kind, message))
        return StageProcessFailed(f"{kind} stage failed in its worker process: {name}: {message} (log: {log})")
    return StageProcessFailed(
        f"{kind} stage: its worker process {_how(outcome['returncode'])}{_reason(log)} (log: {log})"
    )


OOM_LOWER = {  # what each worker-process stage can lower when it runs out of memory
    "gptq": "lower samples (calibration sequences) or seq_len",
    "eora": "lower samples (calibration sequences), seq_len or rank",
}


def oom_line(kind: str, message: str) -> str:
    """One line for a stage that ran out of memory in its worker: where, and what to lower."""
    if message.startswith("out of ") and ": lower " in message:
        return message  # the stage already said what to lower
    where = "GPU memory" if "cuda" in message.lower() or "gpu" in message.lower() else "memory"
    lower = OOM_LOWER.get(kind, "lower samples or seq_len")
    return f"out of {where} in the {kind} stage: {lower}, or run on a device with more memory"


def _how(rc: int | None) -> str:
    if rc is not None and rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc} without a result"


def _reason(log: Path) -> str:
    """The last exception line in the log (`RuntimeError: ...` after a traceback), if any."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    starts = [i for i, ln in enumerate(text) if "Traceback (most recent call last)" in ln]  # after a progress bar
    if not starts:
        return ""
    tail = [ln for ln in text[starts[-1] + 1 :] if ln.strip() and not ln.startswith((" ", "\t"))]
    return f": {tail[0].strip()[:300]}" if tail else ""


# -- the child -------------------------------------------------------------------------------------
def _child() -> int:
    send, job, cancel = child_channel()
    try:
        result = _child_run(job, cancel, send)
        send(event="result", report=result.report, artifacts=result.artifacts)
        return 0
    except Cancelled:
        send(event="cancelled")
        return 0
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, the traceback to the log
        import traceback

        traceback.print_exc()
        send(event="error", type=type(exc).__name__, message=str(exc).strip().replace("\n", " ")[:2000])
        return 1


def _child_run(job: dict, cancel: threading.Event, send) -> StageResult:
    from frankenlab.evals.config import from_dict
    from frankenlab.pipeline import events as ev
    from frankenlab.pipeline.calibration import CalibrationConfig
    from frankenlab.pipeline.loading import load_model
    from frankenlab.pipeline.stages import register

    torch.set_num_threads(int(job["threads"]))
    stage = register(job["kind"], job["module"])
    config = from_dict(stage.Config, job["params"], job["kind"])
    device = torch.device(job["device"])
    given = job["input"]
    lm = load_model(given["folder"], device=job["device"], dtype=job["dtype"])
    model, tokenizer = lm.model, lm.tokenizer

    def listener(e) -> None:
        if isinstance(e, ev.Progress):
            send(event="progress", fraction=e.fraction, message=e.message)
        elif isinstance(e, ev.LogLine):
            send(event="log", message=e.message, level=e.level)
        elif isinstance(e, ev.MetricMeasured):
            send(event="metric", name=e.name, value=e.value, protocol=e.protocol, step=e.step)

    ctx = StageContext(
        tokenizer,
        device,
        from_dict(CalibrationConfig, job["calibration"], "calibration"),
        Path(job["data_dir"]) if job["data_dir"] else None,
        Path(job["work_dir"]),
        listener,
        cancel,
        int(job["index"]),
        None if given.get("spare") else Path(given["folder"]),
    )
    result = stage.run(model, ctx, config)
    artifacts = {k: str(v) for k, v in result.artifacts.items()}
    if "model" not in artifacts:  # the parent reads the model from the folder the stage wrote
        work = Path(job["work_dir"])
        work.mkdir(parents=True, exist_ok=True)
        result.model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        artifacts["model"] = str(work)
    return StageResult(result.model, result.report, artifacts)


def main() -> None:
    child_exit(_child)


if __name__ == "__main__":
    main()
