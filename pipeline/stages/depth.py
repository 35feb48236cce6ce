"""Depth pruning: remove the k least important decoder layers (Shortened LLaMA, Kim et al. 2024).

Importance metrics:
- `perplexity` (thesis default): perplexity of calibration text with the layer alone removed;
  a layer whose removal hurts little is unimportant.
- `l1`: L1 magnitude of the layer's linear weights.
- `taylor`: sum of |W * dL/dW| over the layer's weights, gradient of the LM loss on calibration text.
The first `protected_first` and last `protected_last` layers are never removed. A `plan` (from the
layer grid) or explicit `layers` replaces the ranking with the user's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from frankenlab.evals.config import option, require
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.context import StageContext, StageResult
from frankenlab.pipeline.loading import count_parameters, decoder_layers
from frankenlab.pipeline.plans import LayerPlan, materialize
from frankenlab.pipeline.whatif import WhatIfEstimator

METRICS = ("perplexity", "l1", "taylor")


@dataclass(frozen=True)
class Config:
    k: int = option(2, help="how many decoder layers to remove (the least important ones)", label="k")
    metric: str = option(
        "perplexity",
        choices=METRICS,
        help="how importance is ranked: ppl without the layer (thesis), L1 weight size, or Taylor",
    )
    protected_first: int = option(4, label="protect first", help="the first layers are never removed")
    protected_last: int = option(2, label="protect last", help="the last layers are never removed")
    samples: int = option(8, form=False, help="calibration windows used for the ranking")
    layers: tuple[int, ...] | None = option(None, form=False, help="remove exactly these layers (skips the ranking)")
    plan: str | None = option(
        None, help="a full layer plan, e.g. 0-3,5,5,6-29 (repeats become copies); set from the layer grid"
    )

    def __post_init__(self):
        require(
            self.metric in METRICS, f"unknown importance metric {self.metric!r}; choose one of {', '.join(METRICS)}"
        )
        require(self.k >= 0, f"k (layers to remove) must be 0 or more, got {self.k}")
        require(self.protected_first >= 0 and self.protected_last >= 0, "protected layer counts cannot be negative")
        require(self.samples >= 1, "samples must be at least 1")

    def check_for(self, n_layers: int) -> None:
        """Validate against a model's depth (called before any weights are loaded)."""
        if self.plan is not None:
            LayerPlan.parse(self.plan, n_layers)
            return
        protected = protected_layers(n_layers, self.protected_first, self.protected_last)
        if self.layers is not None:
            bad = sorted(set(self.layers) & protected)
            require(
                not bad,
                f"cannot remove layers {bad}: they are protected (first {self.protected_first}, "
                f"last {self.protected_last}); lower protected_first/protected_last to allow it",
            )
            out = [i for i in self.layers if not 0 <= i < n_layers]
            require(not out, f"layers {out} do not exist: the model has layers 0..{n_layers - 1}")
            return
        free = n_layers - len(protected)
        require(
            self.k <= free,
            f"cannot remove {self.k} of {n_layers} layers: {len(protected)} are protected "
            f"(first {self.protected_first}, last {self.protected_last}), so at most {free} can go",
        )


# -- hooks the registry asks (pipeline/stages/__init__.py) -----------------------------------------
FORM_CUSTOM = {"plan", "layers"}  # the layer grid edits these


def needs_calibration(config: Config) -> bool:
    return config.plan is None and config.layers is None and config.metric != "l1"


def layer_plan(config: Config, n_layers: int) -> LayerPlan | None:
    """The plan this stage will apply when the user gave one (a ranking is known only after it ran)."""
    if config.plan is not None:
        return LayerPlan.parse(config.plan, n_layers)
    if config.layers is not None:
        return LayerPlan.without(n_layers, config.layers)
    return None


def is_identity(config: Config) -> bool:
    """Depth 0 (the thesis' "Depth 0" rows) removes nothing: a sweep leaves the stage out."""
    return config.plan is None and config.layers is None and config.k == 0


def layers_after(config: Config, n_layers: int) -> int:
    plan = layer_plan(config, n_layers)
    return len(plan) if plan is not None else n_layers - config.k


def describe(params: dict) -> str:
    if params.get("plan"):
        return f"Plan {params['plan']}"
    if params.get("layers") is not None:
        return f"Depth -[{','.join(map(str, params['layers']))}]"
    text = f"Depth {params.get('k', '?')}"
    return text + (f" ({params['metric']})" if params.get("metric") not in (None, "perplexity") else "")


def protected_layers(n: int, first: int, last: int) -> set[int]:
    return set(range(min(first, n))) | set(range(max(0, n - last), n))


# -- importance metrics ----------------------------------------------------------------------------
def l1_scores(model: nn.Module, candidates: list[int]) -> dict[int, float]:
    layers = decoder_layers(model)
    return {
        i: float(sum(p.detach().abs().sum() for n, p in layers[i].named_parameters() if p.dim() == 2))
        for i in candidates
    }


def taylor_scores(model: nn.Module, ids: torch.Tensor, candidates: list[int], ctx: StageContext) -> dict[int, float]:
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    was_training = model.training
    req = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {i: [p for p in layers[i].parameters() if p.dim() == 2] for i in candidates}
    for ps in weights.values():
        for p in ps:
            p.requires_grad_(True)
            p.grad = None
    try:
        with torch.enable_grad():
            for b in range(0, ids.shape[0], 4):
                ctx.check_cancel()
                chunk = ids[b : b + 4].to(device)
                loss = model(input_ids=chunk, labels=chunk).loss * chunk.shape[0] / ids.shape[0]
                loss.backward()
        return {i: float(sum((p.detach() * p.grad).abs().sum() for p in ps)) for i, ps in weights.items()}
    finally:
        for p, r in req.items():
            p.requires_grad_(r)
            p.grad = None
        model.train(was_training)


def perplexity_scores(
    model: nn.Module, ids: torch.Tensor, candidates: list[int], ctx: StageContext
) -> dict[int, float]:
    """Perplexity with each candidate layer alone removed.

    This is the what-if estimator's leave-one-out scan on `ids`, so the layer grid's heat colours
    and this ranking agree by construction. It reuses the baseline pass: the hidden states entering
    layer i are computed once, so removing layer i only reruns layers i+1.. (unbounded cache here,
    as before: one (samples, seq_len, hidden) tensor per layer).
    """
    estimator = WhatIfEstimator(model, ctx.tokenizer, ids=ids, max_cache_bytes=None, coarse_rows=0)
    scores = {}
    for done, (i, est) in enumerate(estimator.scan(lambda: ctx.cancelled, layers=candidates)):
        scores[i] = est.ppl
        ctx.progress((done + 1) / len(candidates), f"importance of layer {i}: ppl without it {scores[i]:.2f}")
    return scores


def importance(model: nn.Module, ctx: StageContext, config: Config) -> dict[int, float]:
    n = len(decoder_layers(model))
    protected = protected_layers(n, config.protected_first, config.protected_last)
    candidates = [i for i in range(n) if i not in protected]
    if config.metric == "l1":
        return l1_scores(model, candidates)
    ids = ctx.calibration_ids()[: config.samples]
    if config.metric == "taylor":
        return taylor_scores(model, ids, candidates, ctx)
    return perplexity_scores(model, ids, candidates, ctx)


def run(model: nn.Module, ctx: StageContext, config: Config) -> StageResult:
    n = len(decoder_layers(model))
    config.check_for(n)
    scores: dict[int, float] = {}
    if config.plan is not None:
        plan = LayerPlan.parse(config.plan, n)
    elif config.layers is not None:
        plan = LayerPlan.without(n, config.layers)
    else:
        scores = importance(model, ctx, config)
        remove = sorted(scores, key=lambda i: scores[i])[: config.k]
        plan = LayerPlan.without(n, remove)
    if len(plan) == 0:
        raise RecipeError("the depth stage would remove every layer")
    materialize(model, plan)
    report = {
        "metric": config.metric if scores else "given",
        "scores": {str(i): s for i, s in scores.items()},
        "removed": plan.skipped,
        "repeated": plan.repeated,
        "plan": plan.to_text(),
        "layers_before": n,
        "layers_after": len(plan),
        "protected": sorted(protected_layers(n, config.protected_first, config.protected_last)),
        "params": count_parameters(model),
    }
    ctx.log(f"depth: removed layers {plan.skipped} ({n} -> {len(plan)} layers)")
    return StageResult(model, report)
