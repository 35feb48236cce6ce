"""Franken-LLaMA layer plans: which decoder layers run, in what order, how often.

A plan is an ordered tuple of source-layer indices: a skipped layer is absent, a repeated one is
listed again. `planned(model, plan)` runs a model under a plan without copying weights: the layer
list is swapped for thin slot wrappers around the original modules. Every slot gets its own KV
cache index, so a repeated layer does not overwrite its first pass's cache and skips do not leave
holes. While a plan is applied nobody else may use the model: `planned` holds `model_lock(model)`.
`materialize(model, plan)` turns a plan into a real, smaller (or deeper) model whose config and
`layer_idx` values are renumbered so it round-trips through save/from_pretrained.

We patch only `self_attn.layer_idx` around each call; the modeling code stays Hugging Face's.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.sharing import model_lock


class PlanError(ValueError):
    """A layer plan that cannot be applied; the message says why."""


@dataclass(frozen=True)
class LayerPlan:
    order: tuple[int, ...]
    n_source: int

    def __post_init__(self):
        if self.n_source < 1:
            raise PlanError("a plan needs a model with at least one decoder layer")
        if not self.order:
            raise PlanError("a plan must keep at least one layer")
        bad = [i for i in self.order if not 0 <= i < self.n_source]
        if bad:
            raise PlanError(f"layer indices {bad} are out of range: the model has layers 0..{self.n_source - 1}")

    @classmethod
    def identity(cls, n: int) -> LayerPlan:
        return cls(tuple(range(n)), n)

    @classmethod
    def from_counts(cls, counts: Iterable[int]) -> LayerPlan:
        """From a per-layer run count (0 = skip, 1 = keep, 2+ = repeat), as the layer grid edits it."""
        counts = list(counts)
        if any(c < 0 for c in counts):
            raise PlanError("a layer cannot run a negative number of times")
        return cls(tuple(i for i, c in enumerate(counts) for _ in range(c)), len(counts))

    @classmethod
    def without(cls, n: int, removed: Iterable[int]) -> LayerPlan:
        gone = set(removed)
        return cls(tuple(i for i in range(n) if i not in gone), n)

    @classmethod
    def parse(cls, text: str | list, n_source: int) -> LayerPlan:
        """Accept "0-3,5,5,6-29", "0 1 2 2 3" or a list of ints."""
        if isinstance(text, (list, tuple)):
            return cls(tuple(int(i) for i in text), n_source)
        order: list[int] = []
        for part in re.split(r"[,\s]+", text.strip().strip("[]")):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            try:
                if m:
                    a, b = int(m.group(1)), int(m.group(2))
                    if b < a:
                        raise PlanError(f"range {part!r} runs backwards")
                    order.extend(range(a, b + 1))
                else:
                    order.append(int(part))
            except ValueError:
                raise PlanError(f"cannot read {part!r} in the plan: use indices and ranges like 0-3,5,5,7") from None
        return cls(tuple(order), n_source)

    def counts(self) -> list[int]:
        c = [0] * self.n_source
        for i in self.order:
            c[i] += 1
        return c

    @property
    def skipped(self) -> list[int]:
        return [i for i, c in enumerate(self.counts()) if c == 0]

    @property
    def repeated(self) -> list[int]:
        return [i for i, c in enumerate(self.counts()) if c > 1]

    @property
    def is_identity(self) -> bool:
        return self.order == tuple(range(self.n_source))

    def __len__(self) -> int:
        return len(self.order)

    def to_text(self) -> str:
        """Compact form with ascending runs folded: (0,1,2,3,5,5,6,7) -> "0-3,5,5-7"."""
        parts, i, o = [], 0, self.order
        while i < len(o):
            j = i
            while j + 1 < len(o) and o[j + 1] == o[j] + 1:
                j += 1
            parts.append(str(o[i]) if j == i else f"{o[i]}-{o[j]}")
            i = j + 1
        return ",".join(parts)

    def common_prefix(self, other: LayerPlan) -> int:
        """How many leading positions two plans share (the what-if estimator restarts after it)."""
        n = 0
        for a, b in zip(self.order, other.order, strict=False):
            if a != b:
                break
            n += 1
        return n


class PlanSlot(nn.Module):
    """One position of a plan: runs a source layer with this position's KV-cache index."""

    def __init__(self, layer: nn.Module, slot: int, source: int):
        super().__init__()
        self.layer = layer
        self.slot = slot
        self.source = source

    def forward(self, *args, **kwargs):
        attn = self.layer.self_attn
        saved = attn.layer_idx
        attn.layer_idx = self.slot
        try:
            return self.layer(*args, **kwargs)
        finally:
            attn.layer_idx = saved


def _remap_layer_types(config, order: tuple[int, ...]):
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and types:
        config.layer_types = [types[i] for i in order]


def apply_plan(model: nn.Module, plan: LayerPlan) -> Callable[[], None]:
    """Run `model` under `plan` from now on; returns a function that restores the original."""
    inner = model.model
    original = decoder_layers(model)
    if any(isinstance(m, PlanSlot) for m in original):
        raise PlanError("a plan is already applied to this model; restore it first")
    if len(original) != plan.n_source:
        raise PlanError(f"the plan is for {plan.n_source} layers but the model has {len(original)}")
    config = model.config
    saved_n, saved_types = config.num_hidden_layers, getattr(config, "layer_types", None)
    inner.layers = nn.ModuleList([PlanSlot(original[src], pos, src) for pos, src in enumerate(plan.order)])
    config.num_hidden_layers = len(plan)
    _remap_layer_types(config, plan.order)

    def restore():
        inner.layers = original
        config.num_hidden_layers = saved_n
        if saved_types is not None:
            config.layer_types = saved_types

    return restore


@contextmanager
def planned(model: nn.Module, plan: LayerPlan | None) -> Iterator[nn.Module]:
    """Run `model` under `plan` inside the block, holding the model's lock (`pipeline.sharing`).

    The lock is held for the identity plan too, so the block may always use the model alone.
    """
    with model_lock(model):
        if plan is None or plan.is_identity:
            yield model
            return
        restore = apply_plan(model, plan)
        try:
            yield model
        finally:
            restore()


def materialize(model: nn.Module, plan: LayerPlan) -> nn.Module:
    """Rebuild the decoder stack in place as `plan` says; repeats become real copies."""
    layers = decoder_layers(model)
    if any(isinstance(m, PlanSlot) for m in layers):
        raise PlanError("restore the run-time plan before materializing")
    if len(layers) != plan.n_source:
        raise PlanError(f"the plan is for {plan.n_source} layers but the model has {len(layers)}")
    new, used = [], set()
    for pos, src in enumerate(plan.order):
        layer = layers[src] if src not in used else copy.deepcopy(layers[src])
        used.add(src)
        layer.self_attn.layer_idx = pos
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = pos
        new.append(layer)
    model.model.layers = nn.ModuleList(new)
    model.config.num_hidden_layers = len(new)
    _remap_layer_types(model.config, plan.order)
    return model


@torch.inference_mode()
def greedy_tokens(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, use_cache: bool) -> list[int]:
    """Greedy continuation, used to check that cached and uncached runs agree."""
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )
    return out[0, input_ids.shape[1] :].tolist()
