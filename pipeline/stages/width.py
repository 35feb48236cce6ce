"""Width pruning: WANDA (Sun et al. 2023) with structured N:M, unstructured, or plain magnitude.

Thesis notation: "N:M" prunes N of every M consecutive input weights of each output row, so
1:8 removes 12.5 % and 2:4 removes 50 % (the pattern NVIDIA sparse tensor cores accelerate).
Score: |W_ij| * ||X_j||_2, with X the inputs of the layer collected over calibration text. As in
the WANDA paper, layers are pruned in order and layer l sees the outputs of the already-pruned
layers before it. Within a layer, `sequential` picks where the statistics come from:
  layer       every projection scored on the unpruned layer's activations, then a second pass
              through the pruned layer for the next layer's inputs (the WANDA reference code);
  projection  (default) one pass: each projection is pruned just before it runs, on the inputs it
              really receives once the projections before it are pruned (SparseGPT's "true
              sequential"). Half the forward work; on SmolLM2-135M with 32x128 C4 tokens it
              measured WikiText-2 ppl 188.3 vs 198.0 at 2:4 and 30.35 vs 30.31 at 1:8.
The tensor math is in the pure functions at the top; `run` is the stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from frankenlab.evals.config import option, require
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.context import StageContext, StageResult
from frankenlab.pipeline.layerwise import capture_inputs, edit_as_it_runs, input_square_sums, linear_modules, run_layer
from frankenlab.pipeline.loading import count_parameters, decoder_layers

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("wanda", "magnitude")
SEQUENTIAL = {
    "layer": "per layer: every projection scored on the unpruned layer's activations (WANDA reference code)",
    "projection": "per projection: each scored on the inputs it receives after the projections before it "
    "in the layer are pruned (true-sequential, one pass per layer)",
}


# -- pure tensor math ------------------------------------------------------------------------------
def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (out, in): in every group of m consecutive inputs of a row, drop the n lowest scores."""
    out_f, in_f = scores.shape
    groups = scores.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    drop = torch.topk(groups, n, dim=-1, largest=False).indices  # (out, in/m, n)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, drop, False)
    return keep.reshape(out_f, in_f)


def unstructured_prune_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask dropping the `ratio` lowest scores of each output row (WANDA's per-row comparison group)."""
    k = int(scores.shape[1] * ratio)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        drop = torch.topk(scores, k, dim=1, largest=False).indices
        keep.scatter_(1, drop, False)
    return keep


def wanda_scores(weight: torch.Tensor, act_sq_sum: torch.Tensor | None) -> torch.Tensor:
    """|W| * ||X_j||_2 (WANDA), or |W| alone when no activation norms are given (magnitude)."""
    w = weight.detach().abs().float()  # (out, in)
    if act_sq_sum is None:
        return w
    return w * act_sq_sum.float().sqrt().unsqueeze(0)  # (1, in) broadcast over rows


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs of every row holds at least n zeros."""
    out_f, in_f = weight.shape
    zeros = (weight.reshape(out_f, in_f // m, m) == 0).sum(-1)
    return bool((zeros >= n).all())


# -- config ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """`pattern = "2:4"` (or n, m) for structured N:M; `ratio` for unstructured sparsity instead."""

    pattern: str | None = option(
        None,
        label="N:M",
        help="structured N:M: prunes N of every M consecutive weights of each row (thesis notation; 2:4 removes 50 %)",
    )
    n: int | None = option(None, form=False, help="N of an N:M pattern (or give pattern)")
    m: int | None = option(None, form=False, help="M of an N:M pattern (or give pattern)")
    ratio: float | None = option(None, help="unstructured instead: the fraction of each row pruned")
    method: str = option(
        "wanda", choices=METHODS, help="wanda scores |W|*||X|| with calibration inputs; magnitude uses |W| alone"
    )
    targets: tuple[str, ...] = option(ALL_PROJECTIONS, form=False, help="projections of each decoder layer to prune")
    batch_size: int = option(32, form=False, help="calibration windows per forward (sequential = layer)")
    sequential: str = option(
        "projection",
        label="statistics",
        choices=tuple(SEQUENTIAL),
        help="projection: one pass, each projection scored on the inputs it really receives; "
        "layer: the WANDA reference code (two passes per layer)",
    )

    def __post_init__(self):
        n, m = self.n, self.m
        if self.pattern is not None:
            match = re.fullmatch(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*", str(self.pattern))
            require(match is not None, f"pattern {self.pattern!r} is not of the form N:M (e.g. 2:4, 1:8)")
            n, m = int(match.group(1)), int(match.group(2))
            object.__setattr__(self, "n", n)
            object.__setattr__(self, "m", m)
            object.__setattr__(self, "pattern", None)
        if self.ratio is not None:
            require(n is None and m is None, "give either an N:M pattern or an unstructured ratio, not both")
            require(0.0 < self.ratio < 1.0, f"ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        else:
            require(n is not None and m is not None, "width pruning needs a pattern N:M (e.g. 2:4) or a ratio")
            require(m >= 1, f"M must be a positive integer, got {m}")
            require(n >= 1, f"N must be at least 1 (N:M prunes N of every M weights), got {n}")
            require(
                n < m,
                f"N must be smaller than M: {n}:{m} would prune every weight "
                f"(thesis notation: N:M prunes N of every M)",
            )
        require(self.method in METHODS, f"unknown width method {self.method!r}; choose one of {', '.join(METHODS)}")
        bad = [t for t in self.targets if t not in ALL_PROJECTIONS]
        require(not bad, f"unknown target projection(s) {bad}; choose from {', '.join(ALL_PROJECTIONS)}")
        require(len(self.targets) > 0, "targets must name at least one projection")
        require(self.batch_size >= 1, "batch_size must be at least 1")
        require(
            self.sequential in SEQUENTIAL,
            f"unknown sequential {self.sequential!r}; choose one of {', '.join(SEQUENTIAL)}",
        )

    @property
    def structured(self) -> bool:
        return self.ratio is None

    @property
    def pruned_fraction(self) -> float:
        return self.n / self.m if self.structured else self.ratio

    @property
    def label(self) -> str:
        if self.structured:
            return f"{self.n}:{self.m} (prunes {self.n} of every {self.m}, {self.pruned_fraction:.1%})"
        return f"unstructured {self.ratio:.1%}"

    def to_dict(self) -> dict:
        d = {
            "method": self.method,
            "targets": list(self.targets),
            "batch_size": self.batch_size,
            "sequential": self.sequential,
        }
        if self.structured:
            d["pattern"] = f"{self.n}:{self.m}"
        else:
            d["ratio"] = self.ratio
        return d


# -- hooks the registry asks (pipeline/stages/__init__.py) -----------------------------------------
FORM_CUSTOM = {"pattern", "n", "m", "ratio"}  # the N:M picker edits these


def needs_calibration(config: Config) -> bool:
    return config.method == "wanda"


def describe(params: dict) -> str:
    if params.get("ratio") is not None:
        text = f"Width {100 * float(params['ratio']):g}% unstructured"
    elif params.get("pattern"):
        text = f"Width {params['pattern']}"
    else:
        text = f"Width {params.get('n', '?')}:{params.get('m', '?')}"
    return text + (f" ({params['method']})" if params.get("method") not in (None, "wanda") else "")


def migrate(params: dict, version: int) -> dict:
    """Session schema 1 -> 2: `sequential` appeared with the default "projection"; a version-1
    WANDA stage without it ran the reference statistics, so replays must rerun "layer"."""
    if version < 2 and params.get("method", "wanda") == "wanda":
        params.setdefault("sequential", "layer")
    return params


def check_dimensions(model: nn.Module, config: Config) -> None:
    if not config.structured:
        return
    for li, layer in enumerate(decoder_layers(model)):
        for name, lin in linear_modules(layer, config.targets).items():
            if lin.in_features % config.m:
                raise RecipeError(
                    f"layer {li} {name}: {lin.in_features} inputs are not a multiple of M={config.m}; "
                    "choose an M that divides the hidden and intermediate sizes"
                )


def input_widths(model_config: dict) -> dict[str, int]:
    """Inputs of each projection of a LLaMA-architecture decoder layer, from its config.json."""
    cfg = model_config.get("text_config") or model_config
    hidden = int(cfg["hidden_size"])
    heads = int(cfg.get("num_attention_heads") or 1)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    widths = dict.fromkeys(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), hidden)
    widths.update(o_proj=heads * head_dim, down_proj=int(cfg["intermediate_size"]))
    return widths


def check_config(config: Config, model_config: dict) -> None:
    """N:M against the matrix widths config.json gives, before any weight loads (the same rule as
    `check_dimensions`, which checks the loaded model)."""
    if not config.structured:
        return
    try:
        widths = input_widths(model_config)
    except (KeyError, TypeError, ValueError):
        return  # not a config we can read: the loaded model is checked when the stage runs
    for name in config.targets:
        if widths[name] % config.m:
            raise RecipeError(
                f"{config.n}:{config.m}: {name} has {widths[name]} inputs, not a multiple of M={config.m}; "
                f"choose an M that divides the hidden size ({widths['q_proj']}) and the intermediate size "
                f"({widths['down_proj']})"
            )


# -- stage -----------------------------------------------------------------------------------------
def _mask_for(scores: torch.Tensor, config: Config) -> torch.Tensor:
    if config.structured:
        return nm_prune_mask(scores, config.n, config.m)
    return unstructured_prune_mask(scores, config.ratio)


def run(model: nn.Module, ctx: StageContext, config: Config) -> StageResult:
    check_dimensions(model, config)
    layers = decoder_layers(model)
    use_acts = config.method == "wanda"
    one_pass = use_acts and config.sequential == "projection"
    inputs = None
    if use_acts:
        ids = ctx.calibration_ids()
        # one pass per layer needs complete statistics before a weight changes: the whole set is one batch
        inputs = capture_inputs(model, ids, ids.shape[0] if one_pass else config.batch_size)
    per_target: dict[str, list[int]] = {t: [0, 0] for t in config.targets}  # short name -> [nonzero, total]

    def prune(name: str, lin: nn.Linear, sq_sum: torch.Tensor | None) -> None:
        with torch.no_grad():
            keep = _mask_for(wanda_scores(lin.weight, sq_sum), config)
            lin.weight.mul_(keep.to(lin.weight.dtype))  # in place: the weight stays a normal tensor
        short = name.split(".")[-1]
        per_target[short][0] += int(torch.count_nonzero(lin.weight))
        per_target[short][1] += lin.weight.numel()

    for li, layer in enumerate(layers):
        ctx.check_cancel()
        linears = linear_modules(layer, config.targets)
        with torch.no_grad():  # outside inference mode, so the copies stay trainable by a later LoRA stage
            for lin in linears.values():
                # weights loaded from safetensors are memory-mapped; the first write to each page would
                # be a copy-on-write fault (11 ms vs 1 ms per 576x1536 matrix here): copy them once
                lin.weight.data = lin.weight.data.clone()
        if one_pass:
            try:
                inputs = [edit_as_it_runs(layer, linears, inputs[0], prune)]
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not isinstance(exc, torch.OutOfMemoryError) and "allocate" not in str(exc):
                    raise
                raise RecipeError(
                    f"width: out of memory at layer {li} running the {ids.shape[0]} calibration "
                    "windows as one batch (sequential = 'projection'); set sequential = 'layer' "
                    "with a smaller batch_size, or fewer calibration samples"
                ) from exc
        else:
            # statistics of this layer's inputs (the forward stops once the last projection has its input)
            sq_sums = input_square_sums(layer, linears, inputs) if use_acts else {}
            for name, lin in linears.items():
                prune(name, lin, sq_sums.get(name))
            if use_acts:
                inputs = run_layer(layer, inputs)  # the pruned layer's outputs feed the next layer
        ctx.progress((li + 1) / len(layers), f"layer {li + 1}/{len(layers)} pruned ({config.label})")
    nonzero = sum(v[0] for v in per_target.values())
    total = sum(v[1] for v in per_target.values())
    report = {
        "pattern": config.label,
        "notation": "N:M prunes N of every M consecutive weights in each output row (thesis notation)",
        "method": config.method,
        "statistics": SEQUENTIAL[config.sequential] if use_acts else "none (weight magnitude only)",
        "targeted_density": nonzero / total,
        "density_by_projection": {k: v[0] / v[1] for k, v in per_target.items()},
        "pattern_holds": verify(model, config),
        "params_nonzero": count_parameters(model, nonzero=True),
    }
    ctx.log(f"width {config.label}: targeted density {report['targeted_density']:.4f}")
    return StageResult(model, report)


def verify(model: nn.Module, config: Config) -> bool:
    """Every targeted matrix satisfies the N:M pattern (always True for unstructured)."""
    if not config.structured:
        return True
    return all(
        satisfies_nm(lin.weight, config.n, config.m)
        for layer in decoder_layers(model)
        for lin in linear_modules(layer, config.targets).values()
    )
