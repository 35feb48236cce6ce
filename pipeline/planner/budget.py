"""The planner's byte side: what each per-layer option stores, and what budget a plan must fit.

Weight bytes as stored, priced by `pipeline.weight_bytes` (per-tensor `Storage`, the rules of
`pipeline.footprint`, the same number the compact file measures) from config.json facts alone:

- a decoder layer at option "<pattern>/<bits>": its seven projections N:M pruned (kept values +
  index metadata) and, below 16 bits, GPTQ codes of `bits` plus one fp16 scale and one packed zero
  point per group of `group_size` inputs; unquantized values (bits 16) are bf16; its two RMSNorm
  weights are bf16. Option "skip" (the layer removed by the depth stage) stores nothing.
- the embeddings and the head at `--embed-format` (`bf16` by default: what every stage of the project
  leaves them at; `int8` / `int4` price them as if quantized per group, a what-if no stage produces
  yet), tied embeddings counted once, plus the final norm (bf16).

A budget is `60MiB` (KiB/MiB/GiB, KB/MB/GB, or bytes), `45%` of the model's dense bf16 weight bytes,
or a target (pipeline/targets): its weight memory, or for a target with one shared memory that memory
minus a runtime reserve (KV cache + decode activations at a stated context, pipeline.footprint's
formulas, for the source model's full depth: an upper bound for any plan).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from frankenlab.evals.config import require
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.planner.options import OptionError, parse_option
from frankenlab.pipeline.weight_bytes import ModelShape, embedding_weight_bytes, layer_weight_bytes

DEFAULT_GROUP_SIZE = 128
DENSE_DTYPE = "bfloat16"  # unquantized values, norms, embeddings: the project's 16-bit storage
EMBED_FORMATS = ("bf16", "int8", "int4")
RESERVE_CONTEXT = 512  # tokens of KV cache a shared-memory target keeps free (the thesis' row length)
_UNITS = {
    "": 1,
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
}


# -- the model's shapes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts(ModelShape):
    """What the bytes depend on, read from config.json (`ModelShape.from_config`), with the parameter
    counts the verdict states."""

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of q, k, v, o, gate, up, down."""
        return list(self.projections().values())

    @property
    def layer_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes())

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (self.layer_params + 2 * self.hidden) + embed + self.hidden

    def dense_bytes(self) -> int:
        """Every weight dense in bf16: the reference of a `--budget 45%`."""
        return self.layers * layer_bytes(self, "none/16") + embed_bytes(self, "bf16")


def layer_bytes(facts: ModelFacts, option: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Stored bytes of one decoder layer at `option` ('skip', '<pattern>/<bits>'): pipeline.weight_bytes,
    the one pricing of a per-layer choice (3-bit codes over an N:M pattern are priced dense, as the
    compact file stores them)."""
    try:
        opt = parse_option(option)
    except OptionError as exc:
        raise RecipeError(str(exc)) from None
    if opt.skip:
        return 0
    return layer_weight_bytes(facts, pattern=opt.nm, bits=opt.bits, group_size=group_size, dtype=DENSE_DTYPE)


def embed_bytes(facts: ModelFacts, fmt: str = "bf16", group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Embeddings + head (once when tied) at `fmt`, plus the final norm."""
    require(fmt in EMBED_FORMATS, f"--embed-format {fmt!r}: choose one of {', '.join(EMBED_FORMATS)}")
    bits = None if fmt == "bf16" else int(fmt[3:])
    return embedding_weight_bytes(facts, dtype=DENSE_DTYPE, bits=bits, group_size=group_size)


def bytes_per_param(facts: ModelFacts, option: str, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    """Stored bytes per decoder-linear parameter at `option` (norms included)."""
    return layer_bytes(facts, option, group_size) / facts.layer_params


# -- budgets ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    bytes: int
    label: str  # "60.00 MiB", "45% of the dense bf16 weights (X)", "siracusa weights (4 MiB MRAM)"
    note: str = ""  # the runtime reserve a shared-memory target keeps, when there is one
    reserve: int = 0
    header: int = 0  # kept free for the compact file's header (`header_reserve`): plans fit `plan_bytes`

    @property
    def plan_bytes(self) -> int:
        """The weight bytes a plan may take: the budget less the compact file's header, so the file fits too."""
        return self.bytes - self.header


def parse_size(text: str) -> int:
    """'60MiB', '1.5 GiB', '500MB', '123456' -> bytes; anything else a one-line RecipeError."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = (m.group(2) if m else "").lower()
    require(
        m is not None and unit in _UNITS and float(m.group(1)) > 0,
        f"--budget {text!r} is not a size: write e.g. 60MiB, 1.5GiB, 500MB, 45% or a number of bytes",
    )
    return int(float(m.group(1)) * _UNITS[unit])


def parse_share(text: str | None, what: str = "--validate-within") -> float | None:
    """ "10%" or "0.1" -> 0.1 (strictly between 0 and 1); None stays None; else a one-line RecipeError."""
    if text is None:
        return None
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = math.nan
    require(0 < value < 1, f"{what} {text!r}: give a share of the budget between 0 and 100%, e.g. 10%")
    return value


def runtime_reserve(facts: ModelFacts, context: int = RESERVE_CONTEXT) -> int:
    """KV cache + decode activations at `context` tokens, batch 1, bf16 (pipeline.footprint's formulas)."""
    from types import SimpleNamespace

    from torch import nn

    from frankenlab.pipeline.footprint import decode_activation_bytes, kv_cache

    stub = nn.Module()  # the formulas read only the config (and the dtype given here)
    stub.config = SimpleNamespace(
        num_attention_heads=facts.heads,
        num_key_value_heads=facts.kv_heads,
        head_dim=facts.head_dim,
        hidden_size=facts.hidden,
        intermediate_size=facts.intermediate,
        vocab_size=facts.vocab,
        num_hidden_layers=facts.layers,
    )
    cache = kv_cache(stub, context, 1, DENSE_DTYPE)
    return (cache.bytes if cache else 0) + decode_activation_bytes(stub, context, 1, DENSE_DTYPE)


# The compact file's header (pipeline/compact.py: safetensors entries of every stored part, the layouts
# and the config in its metadata) measured 119,152 bytes for the bundled model's 254 tensors at 3/4-bit
# with N:M layers (~470 bytes a tensor). The bound: 2 x the name's length + 560 per tensor, plus 8 KiB.
HEADER_PER_TENSOR = 560
HEADER_FIXED = 8192


def tensor_names(facts: ModelShape) -> list[str]:
    """The weights a LLaMA-architecture checkpoint of this shape stores (Hugging Face names)."""
    per_layer = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    per_layer += ["input_layernorm", "post_attention_layernorm"]
    names = [f"model.layers.{i}.{n}.weight" for i in range(facts.layers) for n in per_layer]
    return ["model.embed_tokens.weight", "model.norm.weight", *names] + ([] if facts.tied else ["lm_head.weight"])


def header_reserve(facts: ModelShape) -> int:
    """An upper bound on the compact file's header for a model of this shape (any per-layer formats;
    skipped layers only shrink it): what a plan keeps free so its compact file fits the budget."""
    return HEADER_FIXED + sum(2 * len(n) + HEADER_PER_TENSOR for n in tensor_names(facts))


def parse_budget(
    budget: str | None, target: str | None, facts: ModelFacts, *, targets_file: str | None = None
) -> Budget:
    """The weight-byte budget from `--budget` or `--target` (exactly one), with the compact file's
    header kept free (`Budget.header`)."""
    import dataclasses

    got = _parse_budget(budget, target, facts, targets_file=targets_file)
    return dataclasses.replace(got, header=header_reserve(facts))


def _parse_budget(
    budget: str | None, target: str | None, facts: ModelFacts, *, targets_file: str | None = None
) -> Budget:
    from frankenlab.pipeline.units import fmt_bytes

    require(
        (budget is None) != (target is None),
        "give one budget: --budget 60MiB, --budget 45% (of the dense bf16 weights) or --target NAME",
    )
    if budget is not None:
        text = str(budget).strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                pct = -1.0
            require(0 < pct <= 1000 and math.isfinite(pct), f"--budget {text!r}: write a percentage such as 45%")
            dense = facts.dense_bytes()
            return Budget(int(dense * pct / 100), f"{pct:g}% of the dense bf16 weights ({fmt_bytes(dense)})")
        n = parse_size(text)
        return Budget(n, fmt_bytes(n))
    from frankenlab.pipeline.targets import get_target, load_targets

    t = get_target(target, load_targets(*([targets_file] if targets_file else [])))
    if t.weights is not None:
        return Budget(t.weights, f"{t.name} weight memory ({fmt_bytes(t.weights)}, {t.label})")
    reserve = runtime_reserve(facts)
    require(
        t.memory > reserve,
        f"target {t.name}: its {fmt_bytes(t.memory)} do not even hold the runtime reserve ({fmt_bytes(reserve)})",
    )
    return Budget(
        t.memory - reserve,
        f"{t.name} memory ({fmt_bytes(t.memory)}, {t.label}) minus the runtime reserve",
        f"runtime reserve {fmt_bytes(reserve)}: KV cache + decode activations at {RESERVE_CONTEXT} tokens, "
        f"batch 1, bf16, all {facts.layers} layers",
        reserve,
    )
