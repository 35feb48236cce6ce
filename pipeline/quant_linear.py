"""What a GPTQ quantized linear holds, read off the module itself (gptqmodel's packing).

A quantized linear carries gptqmodel's packed buffers: `qweight` (the integer codes, 32 // bits
per int32 word along the input dimension, lowest bits first), `qzeros` (the zero points, packed
the same way along the output dimension) and `scales` (one per group of inputs and output), with
`bits`, `group_size`, `in_features`, `out_features` and usually `g_idx` (the group of every input;
act-order permutes it). It computes w = scale * (code - zero) per group.

Every GPTQ linear gptqmodel builds (its `BaseQuantLinear` kernels) carries those buffers, and so do
the tests' stand-ins, so the question "is this a quantized linear" is answered here, once, from the
buffers: the memory accounting, parameter counts, the compact form, the CPU kernels and the
gptqmodel wrapper all ask `is_quantized_linear` / `quantized_linears`, and none of them needs to
import gptqmodel (slow: kernels and a banner) to ask. This module imports nothing else of the
project but its error type.
"""

from __future__ import annotations

import torch
from torch import nn

from frankenlab.evals.errors import RecipeError

PACKED_BUFFERS = ("qweight", "qzeros", "scales")


def is_quantized_linear(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, b, None), torch.Tensor) for b in PACKED_BUFFERS)


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of every quantized linear in `model`."""
    return {n: m for n, m in model.named_modules() if is_quantized_linear(m)}


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """gptqmodel packing: 32 // bits codes per int32 word along dim 0, lowest bits first."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0] * per, packed.shape[1])[:n]  # (n, cols)


def quant_codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, in), zeros (groups, out)) of a quantized linear with 2/4/8-bit packing."""
    bits = int(module.bits)
    if bits not in (2, 4, 8):
        raise RecipeError(f"{bits}-bit GPTQ packing is not supported by the memory accounting")
    out_f, in_f = int(module.out_features), int(module.in_features)
    codes = unpack_rows(module.qweight, bits, in_f).T  # (out, in)
    zeros = unpack_rows(module.qzeros.T, bits, out_f).T  # (groups, out)
    return codes, zeros


def group_size(module: nn.Module) -> int:
    """Inputs per group; a group size of -1 (one group per row) is the whole input width."""
    g = int(getattr(module, "group_size", -1))
    return g if g > 0 else int(module.in_features)


def group_index(module: nn.Module) -> torch.Tensor:
    """The group of every input channel (int64, on the codes' device): `g_idx`, else in order."""
    g_idx = getattr(module, "g_idx", None)
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(int(module.in_features), device=module.qweight.device) // group_size(module)


def g_idx_trivial(module: nn.Module) -> bool:
    """True when `g_idx` says nothing the group size does not (no act-order permutation to store)."""
    g_idx = getattr(module, "g_idx", None)
    if g_idx is None:
        return True
    expect = torch.arange(g_idx.numel(), device=g_idx.device) // group_size(module)
    return bool(torch.equal(g_idx.long(), expect))


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight a quantized linear computes with (int codes * scale, minus zero)."""
    cached = getattr(module, "_frankenlab_weight", None)  # dequantized once on CPU (quant_cpu.set_kernel)
    if cached is not None:
        return cached
    # gptqmodel's dequantize_weight() is always (in, out); guessing from the shape would leave
    # square matrices (q_proj, o_proj) transposed.
    w = module.dequantize_weight().t()
    return w[: module.out_features, : module.in_features].float()
