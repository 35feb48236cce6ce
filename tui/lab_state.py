"""The lab's state, free of Textual: the loaded model, the session on screen, run folders, chat targets.

`tui/app.py` only wires widgets to this object (attributes down, messages up), so everything the
lab decides can be tested without starting an app: how a run folder is named, which models one
can chat with, what the layer grid shows for a recipe, the scores it colours layers by, and what
a replay says. During a run the session on screen is built in memory from the runner's events
(a `SessionRecorder` that does not save); the session the runner returns, saved by its own
recorder, replaces it at the end. Nobody re-reads session.json while a run goes.
"""

from __future__ import annotations

import copy
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from frankenlab.evals import devices
from frankenlab.pipeline import events as ev
from frankenlab.pipeline.plans import LayerPlan
from frankenlab.pipeline.sharing import model_lock
from frankenlab.pipeline.stages import stage_kind
from frankenlab.sessions import Session, SessionRecorder, load_session
from frankenlab.tui.chat import ChatTarget
from frankenlab.tui.model_cache import ModelCache

PROGRESS_EVERY = 0.1  # seconds: progress events closer than this are not forwarded to the screen
# keys of the lab's model cache (LabState.models)
BASELINE = "baseline"
RUN_COPY = "run copy: "
REPLAY = "replay: "
CHAT_MODEL = "chat: "


def run_copy(model):
    """The copy of the baseline a run changes. On a GPU it is made on the CPU (each weight copied to
    host memory, ties kept) and then moved to the model's device, so no second deep copy is built
    on the GPU; a copy that does not fit there is a one-line out-of-memory error. On a CPU: deepcopy."""
    import torch

    device = devices.model_device(model)
    if device.type != "cuda":
        return copy.deepcopy(model)
    memo: dict = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo:
            continue
        host = t.detach().to("cpu", copy=True)
        memo[id(t)] = (
            torch.nn.Parameter(host, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else host
        )
    twin = copy.deepcopy(model, memo)
    try:
        return twin.to(device)
    except RuntimeError as exc:
        if not devices.is_oom(exc):
            raise
        del twin
        devices.free_cached_memory(device)
        from frankenlab.evals.errors import ModelLoadError

        raise ModelLoadError(
            devices.oom_message(device, "copying the model for the run", "use a smaller model or --device cpu")
        ) from None


def protected_layers(n: int, first: int, last: int) -> set[int]:
    """The first `first` and last `last` of n layers (what the grid underlines)."""
    return set(range(min(first, n))) | set(range(max(0, n - last), n))


def grid_plan(recipe, n_layers: int) -> LayerPlan | None:
    """The layer plan the grid shows for `recipe` on a model of `n_layers`, or None.

    Asks each stage kind for the plan it will apply (`layer_plan` hook); only a plan over the
    model's own layers can be drawn, so the search stops once a stage has changed the depth.
    Raises ValueError when the recipe's plan does not fit this model.
    """
    n = n_layers
    for spec in recipe.stages:
        kind = stage_kind(spec.kind)
        plan = kind.layer_plan(spec.config, n)
        if plan is not None:
            return plan
        if kind.layers_after(spec.config, n) != n:
            return None
    return None


def layer_scores(session, n_layers: int) -> dict[int, float] | None:
    """Importance per layer from the first stage report that has `scores` keyed by layer index
    (depth ranking writes them), or None when there are none or they belong to a deeper model."""
    for st in session.stages:
        scores = (st.report or {}).get("scores")
        if isinstance(scores, dict) and scores:
            try:
                out = {int(k): float(v) for k, v in scores.items()}
            except (TypeError, ValueError):
                return None
            return out if all(0 <= k < n_layers for k in out) else None
    return None


def replay_diff_line(d) -> tuple[str, str]:
    """(text, level) for one metric a replay compared."""
    rel = f" ({d.relative:+.2%})" if d.relative is not None else ""
    level = "info" if d.status in ("ok", "same", "equal") else "warning"
    return f"replay [{d.stage}] {d.name} ({d.protocol}): saved {d.saved} new {d.new}{rel} {d.status}", level


def replay_verdict(result) -> tuple[str, str]:
    """(text, level) summing up a replay."""
    if not result.diffs:  # never "reproduced" when nothing was set beside the saved numbers
        return "replay had nothing to compare: the saved session holds no finished stage with numbers", "warning"
    text = (
        f"replay {'reproduced' if result.ok else 'differs'}: {len(result.diffs)} metrics compared, "
        f"{len(result.flagged)} outside tolerance {result.tolerance:.1%}"
    )
    return text, "info" if result.ok else "warning"


class LabState:
    """What the lab holds between events; methods marked "thread" run in a worker, the rest in the UI."""

    def __init__(
        self,
        *,
        loader: Callable,
        runner: Callable,
        runs_dir: str | Path = "runs",
        data_dir: str | Path | None = None,
        model_ref: str = "default",
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        save_models: bool = True,
        models: ModelCache | None = None,
    ):
        self.loader, self.runner = loader, runner
        self.runs_dir = Path(runs_dir)
        self.data_dir = Path(data_dir) if data_dir else None
        self.model_ref = model_ref or "default"
        self.device, self.dtype, self.trust_remote_code = device, dtype, trust_remote_code
        self.save_models = save_models
        self.loaded = None  # the LoadedModel the lab shows; runs change a copy of it
        # every model the lab holds (baseline, a run's copy, a replay's, chat models), at most
        # FRANKENLAB_MAX_MODELS at once, least recently used dropped first (tui/model_cache.py)
        self.models = models if models is not None else ModelCache()
        self.session: Session | None = None  # the current run's (live), the last run's or the opened one
        self.run_dir: Path | None = None
        self.running = False
        self.cancel = threading.Event()
        self._live: SessionRecorder | None = None
        self._last_progress: dict[int, float] = {}
        self.clock = time.monotonic  # for the progress thinning (a test gives its own)

    # -- the model -------------------------------------------------------------------------------
    def load(self, ref: str):
        """(thread) Load a model with the lab's device options; raises whatever the loader raises.
        Chat models not in use make room first (the old baseline stays until the new one is ready)."""
        self.models.make_room()
        return self.loader(ref, device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code)

    def model_ready(self, lm) -> int:
        """Keep `lm` as the lab's model; returns its number of decoder layers."""
        self.loaded = lm
        self.models.put(BASELINE, lm, keep=True)  # replaces (and lets go of) the previous baseline
        # torch, transformers and textual leave ~1M long-lived objects; a full garbage collection walks
        # them all (measured up to 300 ms, the screen frozen meanwhile). Collect once now, while the
        # user waits for the model anyway, and move the survivors out of the collector's sight
        # (unfreeze first, so a model replaced by this one can still be collected).
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        return self.n_layers

    @property
    def n_layers(self) -> int | None:
        if self.loaded is None:
            return None
        from frankenlab.pipeline.loading import decoder_layers

        return len(decoder_layers(self.loaded.model))

    # -- runs ------------------------------------------------------------------------------------
    def new_run_dir(self, name: str, stamp: str | None = None) -> Path:
        """runs/<name>-<time>, as `frankenlab run` names them (suffixed -2, -3... when taken)."""
        from frankenlab.pipeline.runlock import safe_slug

        stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
        name = safe_slug(name, "run")  # a typed name never leaves the runs folder ("../x", "/etc/x")
        out, k = self.runs_dir / f"{name}-{stamp}", 1
        while out.exists():
            k += 1
            out = self.runs_dir / f"{name}-{stamp}-{k}"
        return out

    def begin_run(self, name: str) -> Path:
        """A new run folder, a fresh cancel flag and an empty live session; returns the folder."""
        self.run_dir = self.new_run_dir(name)
        self.cancel = threading.Event()
        self.running = True
        self._last_progress = {}
        self._live = SessionRecorder(save=False, hash_weights=False)
        return self.run_dir

    def run(self, recipe, out: Path, listener: Callable) -> Session:
        """(thread) Run `recipe` on a copy of the loaded model; returns the runner's saved session."""
        baseline = self.loaded

        def copy_baseline():
            with model_lock(baseline.model):  # the lab keeps its baseline; the run changes a copy
                return run_copy(baseline.model)

        # the copy counts among the lab's models while the run goes (room is made for it first, it is
        # never dropped from under the run) and leaves memory, the GPU's included, with the run
        with self.models.held(f"{RUN_COPY}{out}", copy_baseline) as model:
            try:
                return self.runner(
                    recipe,
                    out,
                    listener=listener,
                    cancel=self.cancel,
                    loaded=replace(baseline, model=model),
                    save_models=self.save_models,
                    data_dir=self.data_dir,
                )
            finally:
                del model

    def replay(self, saved: Session, out: Path, listener: Callable, on_diff: Callable):
        """(thread) Re-run a saved session's recipe into `out`; returns sessions.ReplayResult."""
        from frankenlab.sessions import replay

        # the replay loads its own model (the runner does): a place among the lab's models is kept for
        # it while it runs, so chat models make room for it first
        with self.models.held(f"{REPLAY}{out}", lambda: None):
            return replay(
                saved,
                out,
                model=self.model_ref,
                device=self.device,
                dtype=self.dtype,
                data_dir=self.data_dir,
                listener=listener,
                cancel=self.cancel,
                save_models=self.save_models,
                on_diff=on_diff,
            )

    def forward(self, e: ev.Event) -> bool:
        """(thread) Whether the screen needs this event: progress is thinned to one per 0.1 s per stage."""
        if not isinstance(e, ev.Progress):
            return True
        now = self.clock()
        last = self._last_progress.get(e.stage)
        if e.fraction < 1.0 and last is not None and now - last < PROGRESS_EVERY:
            return False
        self._last_progress[e.stage] = now
        return True

    def apply(self, e: ev.Event) -> bool:
        """Feed one event of the current run to the live session; True when a stage record arrived
        (footprints, artifacts and scores the panes show come with `StageFinished.record`)."""
        if self._live is None:
            return False
        self._live(e)
        if isinstance(e, ev.RunStarted) and self._live.session is not None:
            self.session = self._live.session
        return isinstance(e, ev.StageFinished) and self._live.session is not None

    def end_run(self, session: Session | None) -> None:
        """The run is over: its saved session (None when the runner raised: the live one stays)."""
        self.running = False
        self._live = None
        if session is not None:
            self.session = session

    # -- sessions --------------------------------------------------------------------------------
    def open_session(self, path: str | Path) -> Session:
        """Load (validated) and show a session; raises sessions.SessionError with a one-line message."""
        s = load_session(path)
        self.session = s
        self.run_dir = Path(s.path).parent
        return s

    def save_session_default(self) -> str:
        """A new file in the user's session folder (`<name>-<id>.json`, never the run's own
        session.json, which the run keeps); "session.json" when there is no session."""
        from frankenlab.sessions.store import user_copy_path

        return str(user_copy_path(self.session)) if self.session is not None else "session.json"

    # -- chat ------------------------------------------------------------------------------------
    def chat_targets(self, plan: LayerPlan | None = None) -> dict[str, ChatTarget]:
        """The baseline, the baseline under the grid's `plan`, and every saved stage model of the session."""
        targets: dict[str, ChatTarget] = {}
        lm = self.loaded
        if lm is not None:
            targets["base"] = ChatTarget("base", f"baseline ({lm.source.name})", lambda: (lm.model, lm.tokenizer))
            if plan is not None and not plan.is_identity:
                targets["plan"] = ChatTarget(
                    "plan", f"baseline + plan {plan.to_text()}", lambda: (lm.model, lm.tokenizer), plan=plan
                )
        s = self.session
        for st in s.stages if s is not None else ():
            if st.index > 0 and st.status == "done" and st.artifact:
                path = s.artifact_path(st.index)
                if path is not None:
                    targets[f"stage{st.index}:{st.artifact}"] = ChatTarget(
                        f"stage{st.index}",
                        f"stage {st.index} {st.name or st.kind}",
                        self._artifact_loader(path),
                        cache=self.models,
                        cache_key=f"{CHAT_MODEL}{path} ({self.device}, {self.dtype})",
                    )
        return targets

    def _artifact_loader(self, path: Path) -> Callable[[], tuple]:
        def get():
            lm = self.loader(str(path), device=self.device, dtype=self.dtype)
            return lm.model, lm.tokenizer

        return get
