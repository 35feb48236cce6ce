"""How long a run will take, per stage, before it starts: measured rates on this machine, cached.

`estimate_recipe(recipe)` predicts each stage's wall and CPU seconds (its work and the evaluation
after it) from a few rates measured on the actual model on this machine:
- `load`: loading the model (and, once, converting the bundled GGUF);
- `fwd`: one forward pass of the model (no gradient) on one sequence of N tokens, for perplexity,
  calibration passes, HellaSwag and the open-book prompts, scaled by tokens and by the layers the
  model has at that point of the recipe (a Depth stage removes some);
- `gen`: one greedy decoding step for a batch (generation samples, TriviaQA);
- `lora:<configuration>`: the LoRA stage's set-up and seconds per step, measured by running the
  real stage for `LORA_PROBE_STEPS` steps of the recipe's configuration (batch, seq_len, rank,
  targets, precision, loss: a distillation teacher's forward is inside the step) on a copy of the model;
- `quant`: GPTQ's work per decoder layer (a Cholesky inverse and a column-by-column quantisation
  of each linear's shape, as gptqmodel does) and EoRA's (an SVD per linear).
The rates, their cache (`$FRANKENLAB_CACHE/rates.json`, keyed by machine, model and dtype) and the
probes that measure a missing one live in `pipeline.rates`; `RunEstimate.probe_wall`/`probe_cpu`
say what the probes cost. After a run, `record_outcome` stores the measured over estimated CPU
seconds per stage kind, and later estimates are multiplied by it (a correction that moves a third
of the way each run, kept within 0.25x..4x).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

from frankenlab.pipeline.rates import (  # noqa: F401 - the rate cache's names, importable from here as before
    FWD_PROBE_TOKENS,
    GEN_PROBE_STEPS,
    LORA_PROBE_STEPS,
    RATES_FILE,
    RATES_VERSION,
    Prober,
    RateCache,
    _machine,
    machine_fingerprint,
    model_fingerprint,
    rates_path,
)

# Work per stage beyond the rates: factors fitted once on the bundled model (docs/sessions.md).
WIDTH_PASSES = 1.6  # WANDA: the calibration pass through each layer, its input norms, the masks
CHILD_LOADS = 2.0  # GPTQ/EoRA in a worker process: the worker loads the model, the parent reloads it
SAVE_AS_LOAD = 1.0  # writing a stage's model costs about what loading it does


def human(seconds: float) -> str:
    """A rough duration: "about 40 s", "about 12 min", "about 6 h"."""
    s = max(0.0, float(seconds))
    if s < 90:
        return f"about {max(1, round(s))} s"
    if s < 90 * 60:
        return f"about {round(s / 60)} min"
    if s < 48 * 3600:
        h = s / 3600
        return f"about {h:.1f} h" if h < 10 else f"about {round(h)} h"
    return f"about {s / 86400:.1f} days"


@dataclass
class StageEstimate:
    index: int
    kind: str
    label: str
    wall: float
    cpu: float
    parts: dict = field(default_factory=dict)  # what -> [wall, cpu]
    note: str = ""

    def line(self) -> str:
        note = f"; {self.note}" if self.note else ""
        return f"[{self.index}] {self.label}: {human(self.wall)} ({self.wall:,.0f} s wall, {self.cpu:,.0f} CPU-s){note}"


@dataclass
class RunEstimate:
    stages: list[StageEstimate]
    probe_wall: float = 0.0  # what measuring the rates cost now (0 with a warm cache)
    probe_cpu: float = 0.0
    measured: list[str] = field(default_factory=list)  # the rates measured now
    machine: str = ""
    cache: RateCache | None = field(default=None, repr=False)

    @property
    def wall(self) -> float:
        return sum(s.wall for s in self.stages)

    @property
    def cpu(self) -> float:
        return sum(s.cpu for s in self.stages)

    def total_line(self) -> str:
        return f"estimate: {human(self.wall)} in all ({self.wall:,.0f} s wall, {self.cpu:,.0f} CPU-s) on {self.machine}"

    def probe_line(self) -> str:
        if not self.measured:
            return "rates from the cache (no probe ran)"
        return (
            f"rates measured now ({', '.join(self.measured)}): {self.probe_wall:.0f} s wall, "
            f"{self.probe_cpu:.0f} CPU-s; cached for the next estimate"
        )

    def to_dict(self) -> dict:
        return {
            "wall": self.wall,
            "cpu": self.cpu,
            "probe_wall": self.probe_wall,
            "probe_cpu": self.probe_cpu,
            "measured": self.measured,
            "machine": self.machine,
            "stages": [asdict(s) for s in self.stages],
        }


# -- the estimate ---------------------------------------------------------------------------------
def _add(a: list, b: list, k: float = 1.0) -> list:
    return [a[0] + k * b[0], a[1] + k * b[1]]


NOT_IN_LORA_RATE = ("steps", "samples", "merge", "lr", "warmup_steps", "seed", "rank", "alpha", "dropout")


def _lora_key(config) -> str:
    """One probe per shape of the work: the rank, alpha, dropout, learning rate and seed change a
    step's time by far less than the noise (the adapters' FLOPs are r * (in + out) per token)."""
    keep = {k: v for k, v in asdict(config).items() if k not in NOT_IN_LORA_RATE}
    return "lora:" + hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def evaluation_cost(ev_config, probe: Prober, layer_frac: float) -> tuple[list, dict]:
    """[wall, cpu] of one evaluation (`evals.suite.EvalConfig`), and its parts."""
    from frankenlab.evals.samples import MAX_NEW_TOKENS, PROMPTS

    fwd = probe.rate("fwd")
    parts: dict = {}
    for p in ev_config.perplexity:
        proto = ev_config.protocol(p)
        windows = proto.limit or 600  # the whole split: about 600 windows of 512 tokens for WikiText-2
        tokens = windows * proto.seq_len * (1.0 + (proto.seq_len - FWD_PROBE_TOKENS) / 4096)  # attention grows
        parts[f"perplexity {p}"] = [x * tokens * layer_frac for x in fwd]
    if ev_config.samples:
        b = min(8, len(PROMPTS))
        gen = probe.rate(f"gen:{b}")
        steps = math.ceil(len(PROMPTS) / b) * MAX_NEW_TOKENS
        parts["samples"] = [(c + x * steps) * layer_frac for c, x in zip(gen["call"], gen["step"], strict=True)]
    from frankenlab.evals.qa import MAX_NEW_TOKENS as QA_TOKENS

    for what, n in (("TriviaQA closed", ev_config.triviaqa_closed), ("TriviaQA open", ev_config.triviaqa_open)):
        if n:
            b = ev_config.qa_batch_size
            gen = probe.rate(f"gen:{b}")
            steps = math.ceil(n / b) * QA_TOKENS
            cost = [(c + x * steps) * layer_frac for c, x in zip(gen["call"], gen["step"], strict=True)]
            cost = _add(cost, fwd, 60 * n * layer_frac)  # the prompt: about 60 tokens a question
            if "open" in what:  # the passage: about 400 prompt tokens a question
                cost = _add(cost, fwd, 400 * n * layer_frac)
            parts[what] = cost
    if ev_config.hellaswag:
        parts["HellaSwag"] = [x * ev_config.hellaswag * 4 * 90 * layer_frac for x in fwd]
    total = [0.0, 0.0]
    for v in parts.values():
        total = _add(total, v)
    return total, parts


def estimate_recipe(
    recipe, data_dir=None, *, loaded=None, cache: RateCache | None = None, probe: Prober | None = None
) -> RunEstimate:
    """Each stage's duration (its work, saving its model, the evaluation after it) and the total.

    `loaded`: a `LoadedModel` the probes may use (else they load the model themselves when a rate
    is missing). Never raises for a probe that fails: that stage gets a rough figure and a note."""
    m = recipe.model
    from frankenlab.evals.devices import resolved

    settled = resolved(m.device, m.dtype)
    machine = dict(_machine(settled["device"]))
    if probe is not None:
        cache = probe.cache
    if cache is None:
        cache = RateCache({**machine, **model_fingerprint(m.source), "dtype": settled["dtype"]})
    if probe is None:
        probe = Prober(cache, recipe, data_dir, loaded)
    spent_before = list(probe.spent)
    shape = probe.rate("shape")
    full_layers = shape["layers"] or 1
    layers = full_layers
    evaluate_after = recipe.evaluation.after
    stages: list[StageEstimate] = []
    calib_tokens = recipe.calibration.samples * recipe.calibration.seq_len

    def finish(index, kind, label, parts, note="") -> None:
        last = index == len(recipe.stages)
        if evaluate_after == "each" or (evaluate_after == "last" and (last or index == 0)):
            cost, eparts = evaluation_cost(recipe.evaluation, probe, layers / full_layers)
            parts.update({f"evaluation: {k}": v for k, v in eparts.items()})
        total = [0.0, 0.0]
        for v in parts.values():
            total = _add(total, v)
        k = cache.correction(kind)
        stages.append(StageEstimate(index, kind, label, total[0] * k, total[1] * k, parts, note))

    fwd = probe.rate("fwd")
    finish(0, "baseline", "baseline (load and evaluate)", {"load": list(probe.rate("load"))})
    for index, spec in enumerate(recipe.stages, 1):
        frac = layers / full_layers
        parts: dict = {}
        note = ""
        kind, cfg = spec.kind, spec.config
        if kind == "depth":
            metric = getattr(cfg, "metric", "perplexity")
            if getattr(cfg, "plan", None) is None and getattr(cfg, "layers", None) is None and metric != "l1":
                toks = min(getattr(cfg, "samples", recipe.calibration.samples) or 0, recipe.calibration.samples)
                toks *= recipe.calibration.seq_len
                passes = 3.0 if metric == "taylor" else 1.0 + layers / 2
                parts["importance"] = [x * toks * passes * frac for x in fwd]
            removed = getattr(cfg, "k", 0) or 0
            if getattr(cfg, "plan", None):
                with contextlib.suppress(Exception):
                    from frankenlab.pipeline.plans import LayerPlan

                    removed = layers - len(LayerPlan.parse(cfg.plan, layers))
            elif getattr(cfg, "layers", None):
                removed = len(cfg.layers)
            layers = max(1, layers - removed)
        elif kind == "width":
            parts["calibration pass and masks"] = [x * calib_tokens * frac * WIDTH_PASSES for x in fwd]
        elif kind == "lora":
            key = _lora_key(cfg)
            probe.lora_configs[key] = cfg
            try:
                lr = probe.rate(key)
                scale = frac * full_layers / max(1, lr.get("layers", full_layers))
                parts["set-up"] = list(lr["setup"])
                parts[f"{cfg.total_steps} steps"] = [x * cfg.total_steps * scale for x in lr["step"]]
                every = getattr(cfg, "eval_every", 0) or 0
                if every:  # validation losses on held-out windows: forward passes with the adapters
                    tokens = (cfg.total_steps // every) * (getattr(cfg, "val_windows", 0) or 0) * cfg.seq_len
                    parts["validation"] = [x * tokens * frac for x in fwd]
            except Exception as exc:  # noqa: BLE001 - a probe that cannot run: forward + backward from the rate
                tokens = cfg.total_steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len
                passes = 3.0 + (1.0 if "kd" in str(getattr(cfg, "loss", "ce")) else 0.0)
                parts[f"{cfg.total_steps} steps"] = [x * tokens * passes * frac for x in fwd]
                note = f"rough: the LoRA probe failed ({type(exc).__name__})"
        elif kind in ("gptq", "eora"):
            q = probe.rate("quant")
            parts["worker process"] = [x * CHILD_LOADS for x in probe.rate("load")]
            parts["calibration pass"] = [x * calib_tokens * frac for x in fwd]
            parts["per layer"] = [x * layers for x in q[kind]]
        else:
            parts["calibration pass"] = [x * calib_tokens * frac for x in fwd]
            note = f"rough: no rate model for {kind} stages"
        parts["save model"] = [x * SAVE_AS_LOAD * frac for x in probe.rate("load")]
        finish(index, kind, _label(spec), parts, note)
    spent = [a - b for a, b in zip(probe.spent, spent_before, strict=True)]
    return RunEstimate(stages, spent[0], spent[1], list(probe.measured), _machine_text(machine), cache)


@dataclass
class GridEstimate:
    nodes: dict  # node key -> StageEstimate (its stage and the evaluation after it)
    wall: float
    cpu: float
    probe_wall: float
    probe_cpu: float
    measured: list[str]
    scaled_from: int = 0  # > 0: the total is scaled from this many sampled nodes to the grid's count


def estimate_grid(nodes: dict, chains: dict, configs: list, data_dir=None, node_count: int | None = None):
    """Each node's estimate (every shared prefix counted once, as the sweep runs them) and the total;
    `node_count` > len(nodes): `nodes` is a sample of a bigger grid and the total is scaled to it.
    The probes share one model load per (model, device, dtype)."""
    probes: dict = {}
    per_node: dict = {}
    for c in configs:
        m = c.recipe.model
        who = (m.source, m.device, m.dtype)
        if who not in probes:
            from frankenlab.evals.devices import resolved

            settled = resolved(m.device, m.dtype)
            key = {**dict(_machine(settled["device"])), **model_fingerprint(m.source), "dtype": settled["dtype"]}
            probes[who] = Prober(RateCache(key), c.recipe, data_dir)
        probe = probes[who]
        chain = chains[c.index]
        if all(k in per_node for k in chain):
            continue
        probe.recipe = c.recipe
        est = estimate_recipe(c.recipe, data_dir, probe=probe)
        for k, st in zip(chain, est.stages, strict=False):
            per_node.setdefault(k, st)
    wall = sum(s.wall for s in per_node.values())
    cpu = sum(s.cpu for s in per_node.values())
    scaled = 0
    if node_count and node_count > len(per_node) and per_node:
        scaled, k = len(per_node), node_count / len(per_node)
        wall, cpu = wall * k, cpu * k
    measured = sorted({m for p in probes.values() for m in p.measured})
    spent = [sum(p.spent[i] for p in probes.values()) for i in (0, 1)]
    return GridEstimate(per_node, wall, cpu, spent[0], spent[1], measured, scaled)


def _label(spec) -> str:
    """ "Width 2:4", "LoRA r8 wikitext2": the kind's own description (the name, when the stage has one)."""
    from frankenlab.pipeline.stages import known_kind

    stype = known_kind(spec.kind)
    try:
        text = stype.describe(spec.params()) if stype is not None else spec.kind
    except Exception:  # noqa: BLE001 - a label never stops an estimate
        text = spec.kind
    return f"{spec.name} ({text})" if getattr(spec, "name", "") else text


def _machine_text(machine: dict) -> str:
    if "gpu" in machine:
        return machine["gpu"]
    return f"{machine.get('cpu', '?')} ({machine.get('capability', '?')}, {machine.get('threads', '?')} threads)"


# -- after the run: measured beside estimated, and the correction ---------------------------------
class StageClock:
    """A runner listener: each stage's wall and CPU seconds (this process and its worker processes)."""

    def __init__(self):
        self.seconds: dict[int, list[float]] = {}
        self._open: dict[int, tuple[float, float]] = {}

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __call__(self, e) -> None:
        from frankenlab.pipeline import events as ev

        if isinstance(e, ev.StageStarted):
            self._open[e.stage] = (time.perf_counter(), self._cpu())
        elif isinstance(e, ev.StageFinished) and e.stage in self._open:
            w, c = self._open.pop(e.stage)
            self.seconds[e.stage] = [time.perf_counter() - w, self._cpu() - c]


def record_outcome(estimate: RunEstimate, measured: dict[int, list[float]], cache: RateCache | None = None) -> dict:
    """Measured beside estimated per stage (for the session), and the cache's corrections moved a
    third of the way towards measured / estimated CPU seconds for each stage kind measured."""
    rows = []
    for s in estimate.stages:
        got = measured.get(s.index)
        rows.append(
            {
                "index": s.index,
                "kind": s.kind,
                "estimated_wall": s.wall,
                "estimated_cpu": s.cpu,
                "measured_wall": got[0] if got else None,
                "measured_cpu": got[1] if got else None,
            }
        )
        if cache is not None and got and s.cpu > 0:
            ratio = min(4.0, max(0.25, got[1] / s.cpu)) * cache.correction(s.kind)
            old = cache.correction(s.kind)
            cache.corrections[s.kind] = old + (ratio - old) / 3
    if cache is not None and measured:
        cache.save()
    return {**estimate.to_dict(), "outcome": rows}
