"""Quantized linears on CPU: a fused int4 kernel for decoding, exact float32 for many rows.

gptqmodel's TORCH_FUSED linear opens a quantized folder on CPU (`pipeline.quant.load_quantized`);
`set_kernel` then replaces every quantized linear's forward with `_cpu_forward`, which dispatches by
row count. Up to FUSED_MAX_ROWS rows (decoding) go through aten's fused int4 kernel
`_weight_int4pack_mm_for_cpu` on bf16 activations (the kernel's fast path: with float32 activations
it is ~20x slower), more rows (prefill, perplexity, calibration-sized batches) through float32
`F.linear` on the weight dequantized once (exact values), so perplexity does not move.
`FRANKENLAB_QUANT_KERNEL` (or `load_quantized(kernel=)`) picks "auto" (that split), "exact" (every
call exact: bit-exact generations) or "int4" (every call fused; the float32 copies are freed).
"""

from __future__ import annotations

import collections
import os
import types

import torch

from frankenlab.pipeline.quant_linear import dequantized_weight, group_index, quant_codes, quantized_linears

KERNELS = ("auto", "exact", "int4")
KERNEL_ENV = "FRANKENLAB_QUANT_KERNEL"
KERNEL_NOTES = {  # one line per kernel, for load notes and stage reports
    "auto": "fused int4 (bf16 activations) for decoding, float32 dequantized weights (exact) for prefill and perplexity",
    "exact": "float32 dequantized weights (exact) for every call",
    "int4": "fused int4 (bf16 activations) for every call",
}
# Rows (tokens x batch) up to which "auto" takes the fused int4 kernel. Measured on the bundled model's
# 210 quantized decoder linears (2 threads, AMD EPYC with AVX-512 bf16; `benchmarks/bench_quant.py
# --parts kernels`), exact fp32 F.linear time / fused int4 (bf16 activations) time at M rows:
#   M       1     2     4     8    16    32    64   128
#   calm   ~7x    -   7.0x  3.4x  2.2x  1.7x  1.15x 1.3x   (load ~1.3; M=1: 36.5 ms vs 4.3-5.3 ms)
#   busy   2.7x  3.9x  3.0x  2.8x  2.0x  1.5x  0.9x  1.2x  (load ~3, another job on the 2 cores)
#   busier 1.3x  3.9x  2.3x  1.6x  2.0x  1.2x  1.0x  1.0x  (load ~3.7)
# Past 32 rows the gain is small or gone, and prefill, perplexity and calibration-sized batches keep
# the exact path, so their numbers do not move.
FUSED_MAX_ROWS = 32
_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes aten._weight_int4pack_mm_for_cpu accepts
kernel_calls: collections.Counter[str] = collections.Counter()  # forwards per path, for tests and benchmarks


def kernel_choice(kernel: str | None = None) -> str:
    """`kernel`, else $FRANKENLAB_QUANT_KERNEL, else "auto"; checked against KERNELS."""
    value = (kernel or os.environ.get(KERNEL_ENV) or "auto").strip().lower()
    if value not in KERNELS:
        raise ValueError(
            f"quantized kernel must be one of {', '.join(KERNELS)} (got {value!r}; "
            f"set by ${KERNEL_ENV} or load_quantized(kernel=))"
        )
    return value


def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A quantized linear's forward on CPU (bound per module by `set_kernel`)."""
    kernel = self._frankenlab_kernel
    if kernel == "int4" or (
        kernel == "auto"
        and x.numel() <= FUSED_MAX_ROWS * x.shape[-1]
        and not (x.requires_grad and torch.is_grad_enabled())
    ):
        return _int4_forward(self, x)
    kernel_calls["exact"] += 1
    w = self._frankenlab_weight
    out = torch.nn.functional.linear(x.to(w.dtype), w, self._frankenlab_bias)
    if getattr(self, "adapter", None):
        out = self.adapter.apply(x=x.to(w.dtype), out=out)  # EoRA: out += (x @ A) @ B
    return out


def _int4_forward(self, x: torch.Tensor) -> torch.Tensor:
    """aten's fused CPU int4 kernel on bf16 activations (its fast path; fp32 ones are ~20x slower),
    the output back in float32; bias and the EoRA adapter are applied in float32."""
    kernel_calls["int4"] += 1
    packed, group, scales_and_zeros, perm = self._frankenlab_int4
    shape = x.shape
    xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    if perm is not None:  # desc_act: the input channels in the order of their groups
        xb = xb.index_select(1, perm)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), packed, group, scales_and_zeros)
    out = out.to(torch.float32).reshape(*shape[:-1], self.out_features)
    if self._frankenlab_bias is not None:
        out = out + self._frankenlab_bias
    if getattr(self, "adapter", None):
        out = self.adapter.apply(x=x.to(torch.float32), out=out)
    return out


@torch.no_grad()
def int4_pack(module: torch.nn.Module, weight: torch.Tensor | None = None):
    """(packed, group, scales_and_zeros, perm) for `aten._weight_int4pack_mm_for_cpu`, or None.

    None when the module is not 4-bit, the kernel is missing, the groups do not fit the kernel's
    group sizes, or the codes do not reproduce `weight` (the exact dequantized weight) bit for bit.
    The kernel computes w = (q - 8) * scale + offset per group; GPTQ's w = scale * (q - zero), so
    offset = (8 - zero) * scale (0 for symmetric quantization). Scales are rounded to bf16 there.
    """
    if (
        int(getattr(module, "bits", 0)) != 4
        or getattr(module, "planar", False)
        or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    ):
        return None
    _out_f, in_f = int(module.out_features), int(module.in_features)
    try:
        codes, zeros = quant_codes(module)  # (out, in), (groups, out)
    except Exception:  # noqa: BLE001 - a packing we do not read: the exact path serves it
        return None
    g_idx = group_index(module)
    scales = module.scales.float()
    if weight is None:
        weight = dequantized_weight(module)
    if not torch.equal(scales[g_idx].T * (codes - zeros[g_idx].T).float(), weight):
        return None
    perm = torch.argsort(g_idx, stable=True)
    sorted_groups = g_idx[perm]
    group = next(
        (
            g
            for g in _KERNEL_GROUPS
            if in_f % g == 0 and bool((sorted_groups.view(-1, g) == sorted_groups.view(-1, g)[:, :1]).all())
        ),
        None,
    )
    if group is None:
        return None
    first = sorted_groups[::group]  # the GPTQ group of every kernel group
    s, z = scales[first], zeros[first].float()  # (in / group, out)
    scales_and_zeros = torch.stack([s, (8 - z) * s], dim=2).to(torch.bfloat16).contiguous()
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[:, perm].to(torch.int32).contiguous(), 1)
    except RuntimeError:
        return None
    identity = torch.equal(perm, torch.arange(in_f))
    return packed, group, scales_and_zeros, None if identity else perm


@torch.no_grad()
def set_kernel(model: torch.nn.Module, kernel: str | None = None) -> dict[str, int]:
    """Run every quantized linear of a CPU model on `kernel` (`kernel_choice`); returns {path: modules}.

    - "exact": float32 `F.linear` on the weight dequantized once (exact values; what perplexity and
      `frankenlab memory` read); keeps a float32 copy of each weight (4 bytes per weight).
    - "int4": aten's fused int4 kernel for every call, bf16 activations (logits close, not equal);
      keeps only the packed copy (0.5 byte per weight plus bf16 group scales); the float32 copy is freed.
    - "auto": int4 for calls of up to FUSED_MAX_ROWS rows (decoding), exact for more (prefill,
      perplexity); keeps both copies.
    A module the kernel cannot take (not 4-bit, groups it does not accept) runs exact in every mode.
    The packed GPTQ buffers stay what the model stores and what the memory accounting prices.
    """
    kernel = kernel_choice(kernel)
    counts: collections.Counter[str] = collections.Counter()
    for mod in quantized_linears(model).values():
        weight = getattr(mod, "_frankenlab_weight", None)
        if weight is None:
            weight = dequantized_weight(mod).contiguous()
        if kernel != "exact" and not hasattr(mod, "_frankenlab_int4"):
            mod._frankenlab_int4 = int4_pack(mod, weight)
        fused = getattr(mod, "_frankenlab_int4", None) is not None
        mode = kernel if fused else "exact"
        mod._frankenlab_weight = None if mode == "int4" else weight
        bias = getattr(mod, "bias", None)
        mod._frankenlab_bias = bias.float() if isinstance(bias, torch.Tensor) else None
        mod._frankenlab_kernel = mode
        mod.forward = types.MethodType(_cpu_forward, mod)
        counts[mode] += 1
    model.frankenlab_kernel = kernel
    return dict(counts)


@torch.no_grad()
def prepare_for_cpu(model: torch.nn.Module, kernel: str | None = None) -> dict[str, int]:
    """The whole model in float32 and its quantized linears on `kernel` (`set_kernel`)."""
    model.float()
    return set_kernel(model, kernel)
