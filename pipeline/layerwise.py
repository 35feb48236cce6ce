"""Run a decoder stack one layer at a time on cached inputs.

WANDA prunes layer l on the inputs produced by the already-pruned layers before it, and the
what-if estimator restarts a plan at the first position where it differs from the baseline.
Both need the hidden states entering a layer plus the keyword arguments the model passes to
every layer (causal mask, rotary position embeddings). We capture those once with a pre-hook on
the first layer and stop the forward pass there, so nothing of the modeling code is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from frankenlab.pipeline.loading import decoder_layers


class _Stop(Exception):
    pass


@dataclass
class LayerInput:
    hidden: torch.Tensor  # (B, T, H) hidden states entering a layer
    kwargs: dict  # attention_mask, position_embeddings, position_ids, ...


def layer_hidden(out) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def capture_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> list[LayerInput]:
    """Inputs to decoder layer 0 for `ids` (N, T), in batches of `batch_size`."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    captured: list[LayerInput] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        captured.append(LayerInput(hidden.detach(), kw))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in range(0, ids.shape[0], batch_size):
            chunk = ids[b : b + batch_size].to(device)
            try:
                model.model(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.inference_mode()
def run_layer(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """Outputs of one layer for each cached batch, as inputs for the next layer."""
    return [LayerInput(layer_hidden(layer(x.hidden, use_cache=False, **x.kwargs)), x.kwargs) for x in inputs]


class _SquareSums:
    """Forward pre-hooks adding up the squared inputs, per input feature, of a set of projections."""

    def __init__(self, linears: dict[str, nn.Linear], on_input=None):
        self.linears = linears
        self.sums = {
            name: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)
            for name, lin in linears.items()
        }
        self.seen: set[str] = set()
        self.on_input = on_input  # called as on_input(name, linear) after its sums are complete
        self._last: tuple = (None, None)  # previous hook's input and its reduction: q, k, v share one

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0]
            if self._last[0] is not x:
                self._last = (x, x.detach().float().square().sum(dim=tuple(range(x.dim() - 1))))
            self.sums[name] += self._last[1]
            self.seen.add(name)
            if self.on_input is not None:
                self.on_input(name, self.linears[name])
            elif len(self.seen) == len(self.linears):
                raise _Stop  # statistics only: the rest of the layer's work is not needed

        return hook

    def run(self, layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
        handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in self.linears.items()]
        outputs = []
        try:
            for x in inputs:
                self.seen.clear()
                self._last = (None, None)
                try:
                    outputs.append(LayerInput(layer_hidden(layer(x.hidden, use_cache=False, **x.kwargs)), x.kwargs))
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            self._last = (None, None)  # do not keep the last activation alive
        return outputs


@torch.inference_mode()
def input_square_sums(
    layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[LayerInput]
) -> dict[str, torch.Tensor]:
    """Per input feature, the summed squares of what each of `linears` receives when `layer` runs on `inputs`.

    Returns float32 vectors (in_features,), WANDA's ||X_j||_2 squared. The forward pass of each batch
    stops as soon as every listed projection has seen its input, so the work after the last one (for
    a LLaMA layer with all seven projections: the down projection and the residual add) is never
    done; projections fed the same tensor (q, k, v) share one reduction. The numbers are exactly
    those of a full forward with hooks.
    """
    sums = _SquareSums(linears)
    sums.run(layer, inputs)
    return sums.sums


@torch.inference_mode()
def edit_as_it_runs(layer: nn.Module, linears: dict[str, nn.Linear], x: LayerInput, edit) -> LayerInput:
    """Run `layer` once on the single batch `x`; just before each of `linears` is applied, call
    `edit(name, linear, square_sums_of_its_input)`, which may change the weight in place.

    Each projection is therefore scored on the inputs it really receives once the projections
    before it in the layer have been edited ("true sequential" in the SparseGPT/GPTQ code), and
    the returned output is the edited layer's. One pass instead of two; the whole calibration set
    must be one batch, since the statistics have to be complete before the weight changes.
    """
    sums = _SquareSums(linears)
    sums.on_input = lambda name, lin: edit(name, lin, sums.sums[name])
    try:
        return sums.run(layer, [x])[0]
    finally:
        sums.on_input = None  # break the cycle so nothing of this layer waits for the garbage collector


def linear_modules(layer: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Linear projections of a decoder layer whose short name is in `targets` (q_proj, up_proj...)."""
    out = {}
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets:
            out[name] = mod
    return out
