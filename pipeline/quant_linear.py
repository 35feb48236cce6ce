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

Only gptqmodel's torch kernels on the CPU keep those buffers as the checkpoint saved them. On a GPU
the kernel (Marlin, Machete, ExllamaV2...) repacks or empties them and may have no
`dequantize_weight`; `pipeline.quant.load_quantized` then attaches the saved checkpoint's tensors
(`SavedPacking`, read from the folder's safetensors on CPU when asked), and every reader here goes
through `packing(module)`: statistics, parameter counts and bytes never read a runtime kernel's
buffers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from frankenlab.evals.errors import RecipeError

PACKED_BUFFERS = ("qweight", "qzeros", "scales")


SAVED_ATTR = "_frankenlab_saved"  # a module's SavedPacking, when its runtime buffers are not the saved ones


class SavedPacking:
    """A quantized linear's packed tensors as its saved checkpoint holds them, read on CPU when asked.

    Duck-types what the readers of this module ask of a quantized linear (`bits`, `group_size`,
    `in_features`, `out_features`, `qweight`, `qzeros`, `scales`, `g_idx`, `bias`). Zero points come
    in gptqmodel's runtime convention (v2): a v1 checkpoint ("checkpoint_format": "gptq") stores them
    minus one, and the same constant gptqmodel adds on load is added here. Nothing is kept but the
    file names and `memo` (results computed once: the checkpoint does not change under a loaded model).
    """

    def __init__(
        self,
        files: dict[str, str],
        prefix: str,
        *,
        bits: int,
        group_size: int,
        in_features: int,
        out_features: int,
        v1_zeros: bool,
    ):
        self.files, self.prefix = files, prefix
        self.bits, self.group_size = int(bits), int(group_size)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.v1_zeros = v1_zeros
        self.memo: dict = {}

    def _get(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        key = f"{self.prefix}.{name}"
        file = self.files.get(key)
        if file is None:
            return None
        with safe_open(file, framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    @property
    def qweight(self) -> torch.Tensor:
        return self._get("qweight")

    @property
    def qzeros(self) -> torch.Tensor:
        zeros = self._get("qzeros")
        if self.v1_zeros and self.bits in (2, 4, 8) and zeros.dtype == torch.int32:
            zeros = zeros + sum(1 << (i * self.bits) for i in range(32 // self.bits))  # gptqmodel's v1 -> v2
        return zeros

    @property
    def scales(self) -> torch.Tensor:
        return self._get("scales")

    @property
    def g_idx(self) -> torch.Tensor | None:
        return self._get("g_idx")

    @property
    def bias(self) -> torch.Tensor | None:
        return self._get("bias")

    def remember(self, key: str, compute: Callable[[], object]):
        """compute(), once per key (the saved checkpoint never changes under a loaded model)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


def saved_packing(module: nn.Module) -> SavedPacking | None:
    saved = getattr(module, SAVED_ATTR, None)
    return saved if isinstance(saved, SavedPacking) else None


def packing(module: nn.Module):
    """What the readers read of a quantized linear: its saved tensors when attached, else its own buffers."""
    return saved_packing(module) or module


def is_quantized_linear(module: nn.Module) -> bool:
    if saved_packing(module) is not None:
        return True
    return all(isinstance(getattr(module, b, None), torch.Tensor) for b in PACKED_BUFFERS)


def checkpoint_tensors(folder: str | Path) -> dict[str, str]:
    """{tensor name: safetensors file} of a saved folder (one file or several shards)."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            out.update(dict.fromkeys(f.keys(), str(file)))
    return out


def attach_saved(model: nn.Module, folder: str | Path, runtime_is_saved: Callable[[nn.Module], bool]) -> int:
    """Give every quantized linear of `model` whose runtime buffers are not the saved ones
    (`runtime_is_saved(module)` False) its `SavedPacking` from `folder`; returns how many got one."""
    files = checkpoint_tensors(folder)
    try:
        qcfg = json.loads((Path(folder) / "quantize_config.json").read_text())
    except (OSError, ValueError):
        qcfg = {}
    v1 = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq") == "gptq"
    attached = 0
    for key in files:
        if not key.endswith(".qweight"):
            continue
        prefix = key[: -len(".qweight")]
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        if runtime_is_saved(module):
            continue
        saved = SavedPacking(
            files,
            prefix,
            bits=int(getattr(module, "bits", None) or qcfg.get("bits", 4)),
            group_size=int(getattr(module, "group_size", None) or qcfg.get("group_size", -1)),
            in_features=int(module.in_features),
            out_features=int(module.out_features),
            v1_zeros=v1,
        )
        object.__setattr__(module, SAVED_ATTR, saved)  # a plain attribute: no submodule, no buffer
        attached += 1
    return attached


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of every quantized linear in `model`."""
    return {n: m for n, m in model.named_modules() if is_quantized_linear(m)}


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """gptqmodel packing along dim 0, lowest bits first: 32 // bits codes per int32 word for 2/4/8 bits;
    for 3 bits the words of a column are one little-endian bit stream (32 codes in 3 words, a code may
    straddle two words: GPTQ's 3-bit layout)."""
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.to(torch.int32).unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
        return codes.reshape(packed.shape[0] * per, packed.shape[1])[:n]  # (n, cols)
    words, cols = packed.shape
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device).view(1, -1, 1)
    stream = ((packed.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(words * 32, cols)  # bit i of the stream
    stream = stream[: n * bits].reshape(n, bits, cols)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device)).view(1, -1, 1)
    return (stream * weights).sum(1, dtype=torch.int32)  # (n, cols)


def quant_codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, in), zeros (groups, out)) of a quantized linear with 2/3/4/8-bit packing."""
    module = packing(module)
    bits = int(module.bits)
    if bits not in (2, 3, 4, 8):
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
    module = packing(module)
    g_idx = getattr(module, "g_idx", None)
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(int(module.in_features), device=module.qweight.device) // group_size(module)


def g_idx_trivial(module: nn.Module) -> bool:
    """True when `g_idx` says nothing the group size does not (no act-order permutation to store)."""
    module = packing(module)
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
    saved = saved_packing(module)
    if saved is not None:  # the checkpoint's codes on CPU (a GPU kernel may repack them, or not dequantize)
        codes, zeros = quant_codes(saved)
        g_idx = group_index(saved)
        return saved.scales.float()[g_idx].T * (codes - zeros[g_idx].T).float()
    # gptqmodel's dequantize_weight() is always (in, out); guessing from the shape would leave
    # square matrices (q_proj, o_proj) transposed.
    w = module.dequantize_weight().t()
    return w[: module.out_features, : module.in_features].float()
