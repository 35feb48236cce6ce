"""PEFT LoRA adapters on sparse models: keep-masks, density, merging without losing the zeros.

Split out of the lora stage (pipeline/stages/lora.py) because these helpers are about an adapter
model, not about training one: the gptq stage and the child-stage worker merge an adapter left by an
earlier lora stage (`is_peft`, `merge_keeping_mask`) without importing the training stage, and
`_peft` works around peft's gptqmodel/optimum version gate wherever peft builds LoRA layers.
"""

from __future__ import annotations

import torch
from torch import nn


# -- sparsity --------------------------------------------------------------------------------------
def sparse_masks(model: nn.Module, targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Keep-masks (weight != 0) of targeted linears that hold zeros; dense ones need none."""
    masks = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets:
            keep = mod.weight.detach() != 0
            if not bool(keep.all()):
                masks[name] = keep
    return masks


def targeted_density(model: nn.Module, targets: tuple[str, ...]) -> float:
    nz = total = 0
    for name, mod in model.named_modules():
        parts = name.split(".")
        short = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
        if isinstance(mod, nn.Linear) and short in targets and "lora_" not in name:
            w = mod.weight.detach()
            nz += int(torch.count_nonzero(w))
            total += w.numel()
    return nz / total if total else 1.0


@torch.no_grad()
def merge_keeping_mask(peft_model) -> tuple[nn.Module, int]:
    """Merge a PEFT LoRA model into its base weights and re-zero what was zero before.

    The base weights of an unmerged adapter still hold the pruning zeros, so the masks are read
    from them just before merging. Returns the plain model and how many matrices were re-masked.
    """
    masks = {}
    for name, mod in peft_model.named_modules():
        base = getattr(mod, "base_layer", None)
        if isinstance(base, nn.Linear) and hasattr(mod, "lora_A"):
            keep = base.weight != 0
            if not bool(keep.all()):
                masks[name] = keep
    model = peft_model.merge_and_unload()
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        short = name.removeprefix("base_model.model.")
        modules[short].weight.mul_(keep.to(modules[short].weight.dtype))
    return model, len(masks)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _peft():
    """peft's LoraConfig and get_peft_model, usable when gptqmodel is installed without optimum.

    peft 0.17+ refuses to build any LoRA layer when gptqmodel is installed but optimum is not: a
    version gate only (nothing imports optimum). Our LoRA never wraps quantized layers (the recipe
    forbids lora after gptq), so where the probe fails we answer "gptqmodel not available" to peft.
    """
    import sys

    import peft.import_utils as iu
    from peft import LoraConfig, get_peft_model

    try:
        iu.is_gptqmodel_available()
    except ImportError:
        probe = iu.is_gptqmodel_available
        for name, mod in list(sys.modules.items()):
            if name.startswith("peft") and getattr(mod, "is_gptqmodel_available", None) is probe:
                mod.is_gptqmodel_available = lambda: False
    return LoraConfig, get_peft_model


def add_adapter(model: nn.Module, *, rank: int, alpha: float, dropout: float, targets, seed: int):
    """`model` as a PEFT model with a fresh LoRA adapter on the `targets` projections, initialised
    from `seed` (the stage's, and the plain PEFT loop `benchmarks.bench_lora` compares it with)."""
    LoraConfig, get_peft_model = _peft()
    torch.manual_seed(seed)
    return get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(targets),
            task_type="CAUSAL_LM",
        ),
    )
