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

from .models import decoder_layers


class _Stop(Exception):
    pass


@dataclass
class LayerInput:
    hidden: torch.Tensor  # (B, T, H) hidden states entering a layer
    kwargs: dict  # attention_mask, position_embeddings, position_ids, ...


def _out_hidden(out) -> torch.Tensor:
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
            chunk = ids[b:b + batch_size].to(device)
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
    return [LayerInput(_out_hidden(layer(x.hidden, use_cache=False, **x.kwargs)), x.kwargs) for x in inputs]


@torch.inference_mode()
def head_nll(model: nn.Module, inputs: list[LayerInput], ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL from hidden states leaving the last layer, and the token count."""
    device = next(model.parameters()).device
    total, count, row = 0.0, 0, 0
    for x in inputs:
        h = model.model.norm(x.hidden)
        logits = model.lm_head(h).float()  # (B, T, V)
        labels = ids[row:row + h.shape[0]].to(device)
        row += h.shape[0]
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                           reduction="sum")
        total += float(loss)
        count += labels[:, 1:].numel()
    return total, count


def linear_modules(layer: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Linear projections of a decoder layer whose short name is in `targets` (q_proj, up_proj...)."""
    out = {}
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets:
            out[name] = mod
    return out
