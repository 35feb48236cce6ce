"""How one tensor is stored, read off the tensor itself: dense, N:M sparse, bitmask sparse, GPTQ int4.

The byte counts and the reasoning behind each format are in `pipeline/footprint.py`'s docstring;
this module holds the per-tensor half (`Storage`, `detect_storage`, the storage of a quantized
linear), `footprint.py` the per-model half (footprints, KV cache, what-if assumptions). What a
quantized linear holds (its codes, zero points, groups) is read in `pipeline/quant_linear.py`.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.quant_linear import (
    g_idx_trivial,
    group_index,
    group_size,
    packing,
    quant_codes,
    saved_packing,
    unpack_rows,
)

NM_CANDIDATE_M = (2, 4, 8, 16, 32)
BITMASK_MIN_SAVING = 0.10  # unstructured sparsity counts only when the bitmask form saves >= 10 %
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALE_BYTES = 2  # GPTQ scales are fp16
_LAYER = re.compile(r"\.layers\.(\d+)\.")

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise RecipeError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[name]


def _itemsize(name: str) -> int:
    dtype = getattr(torch, name, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def nm_index_bits(n: int, m: int) -> int:
    """Index metadata bits per group of m for an n-pruned-of-m pattern (see module docstring)."""
    k = m - n
    return min(min(n, k) * max(1, math.ceil(math.log2(m))), m)


# -- storage of one tensor -------------------------------------------------------------------------
@dataclass(frozen=True)
class Storage:
    """How one weight tensor is (or would be) stored; `parts()` prices it in bytes."""

    shape: tuple[int, ...]  # (out, in) for matrices
    dtype: str = "float32"  # of stored floating values (unquantized)
    nm: tuple[int, int] | None = None  # (n, m): n of every m consecutive inputs pruned
    nnz: int | None = None  # unstructured: kept values, with a 1-bit mask
    quant: tuple[int, int] | None = None  # (bits, group): integer codes + fp16 scale + zero per group
    extra_bytes: int = 0  # bias of a quantized module, a non-trivial g_idx

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def dtype_bits(self) -> int:
        return _itemsize(self.dtype) * 8

    @property
    def kept(self) -> int:
        if self.nm:
            n, m = self.nm
            return self.numel // m * (m - n)
        return self.nnz if self.nnz is not None else self.numel

    def parts(self) -> dict[str, int]:
        bits = self.quant[0] if self.quant else self.dtype_bits
        out = {"values": math.ceil(self.kept * bits / 8)}
        if self.nm:
            n, m = self.nm
            out["index"] = math.ceil(self.numel // m * nm_index_bits(n, m) / 8)
        elif self.nnz is not None:
            out["index"] = math.ceil(self.numel / 8)
        if self.quant:
            qbits, group = self.quant
            groups = math.ceil(self.cols / group) * self.rows
            out["scales"] = groups * SCALE_BYTES + math.ceil(groups * qbits / 8)
        if self.extra_bytes:
            out["extra"] = self.extra_bytes
        return out

    @property
    def bytes(self) -> int:
        return sum(self.parts().values())

    @property
    def label(self) -> str:
        bits = []
        if self.nm:
            bits.append(f"{self.nm[0]}:{self.nm[1]}")
        elif self.nnz is not None:
            bits.append(f"sparse {1 - self.nnz / self.numel:.0%}")
        bits.append(f"int{self.quant[0]} g{self.quant[1]}" if self.quant else _SHORT.get(self.dtype, self.dtype))
        return " ".join(bits)


def detect_storage(
    weight: torch.Tensor, *, candidates: tuple[int, ...] = NM_CANDIDATE_M, base: Storage | None = None
) -> Storage:
    """The cheapest honest storage of a tensor's zeros: dense, N:M (per-matrix pattern) or bitmask.

    `base` prices the candidates in another value format (a quantized matrix's codes).
    """
    dense = base or Storage(tuple(weight.shape), dtype_name(weight.dtype))
    if weight.dim() != 2 or not (weight.is_floating_point() or base is not None) or weight.device.type == "meta":
        return dense
    zeros = weight.numel() - int(torch.count_nonzero(weight))
    if zeros == 0 or zeros * max(candidates) < weight.numel() and zeros < weight.numel() * BITMASK_MIN_SAVING:
        return dense  # too few zeros for any N:M pattern or a worthwhile bitmask (fast path)
    best = dense
    rows, cols = weight.shape
    counts, width = (weight == 0).view(torch.uint8), 1  # zeros per group of `width` consecutive inputs
    for m in sorted(candidates):
        if cols % m or m % width or m // width != 2:
            break
        counts = counts[:, 0::2] + counts[:, 1::2]  # (rows, cols/m): halving is cheaper than reshape-sum
        width = m
        n = min(int(counts.min()), m - 1)  # zeros every group of m has
        if n >= 1:
            cand = replace(dense, nm=(n, m))
            if cand.bytes < best.bytes:
                best = cand
    cand = replace(dense, nnz=weight.numel() - zeros)  # N:M is preferred unless the mask saves >= 10 %
    if cand.bytes <= best.bytes * (1 - BITMASK_MIN_SAVING):
        best = cand
    return best


_CACHE: dict[int, tuple] = {}


def cached(tensor: torch.Tensor, compute):
    """compute(tensor), remembered until the tensor changes (in-place version, storage) or dies.

    The runner prices the model after every stage; most tensors did not change since the last time.
    """
    if tensor.is_inference():  # no version counter: cannot tell whether it changed
        return compute(tensor)
    key = id(tensor)
    stamp = (tensor._version, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is tensor and hit[1] == stamp:
        return hit[2]
    value = compute(tensor)
    try:
        ref = weakref.ref(tensor, lambda _r, key=key: _CACHE.pop(key, None))
    except TypeError:
        return value
    _CACHE[key] = (ref, stamp, value)
    return value


# -- GPTQ quantized linears (pipeline.quant_linear reads their buffers) ------------------------------
def quantized_storage(module: nn.Module) -> tuple[Storage, int]:
    """Storage of a gptqmodel linear and the bytes of its packed tensors (qweight+qzeros+scales).

    Read from the saved checkpoint when the module carries it (a GPU kernel's buffers are repacked,
    `pipeline.quant_linear.packing`), else from the module's own buffers."""
    saved = saved_packing(module)
    if saved is not None:
        return saved.remember("storage", lambda: _quantized_storage(saved))
    return _quantized_storage(module)


def _quantized_storage(module) -> tuple[Storage, int]:
    bits, group = int(module.bits), group_size(module)
    shape = (int(module.out_features), int(module.in_features))
    extra = 0
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        extra += bias.numel() * bias.element_size()
    if not g_idx_trivial(module):
        extra += module.g_idx.numel() * module.g_idx.element_size()
    buffers = 0
    for b in ("qweight", "qzeros", "scales"):
        t = getattr(module, b)
        buffers += t.numel() * t.element_size()
    storage = Storage(shape, "float16", quant=(bits, group), extra_bytes=extra)
    if bits in (2, 4, 8):
        if module is packing(module):
            storage = cached(module.qweight, lambda _q: _quant_sparsity(module, storage))
        else:  # a SavedPacking: its own memo caches the result
            storage = _quant_sparsity(module, storage)
    return storage, buffers + extra


def _quant_sparsity(module: nn.Module, storage: Storage, sample_rows: int = 64) -> Storage:
    """N:M or bitmask storage of the codes that dequantize to exactly 0 (code == zero point), if cheaper.

    Symmetric 4-bit GPTQ puts 10-15 % of a dense matrix's codes on the zero point, too few to pay
    for any index but enough to defeat a zero-count fast path; a few output rows decide first.
    """
    bits, (rows, cols) = int(module.bits), storage.shape
    g_idx = group_index(module)
    zeros = unpack_rows(module.qzeros.T, bits, rows).T  # (groups, out)
    k = min(rows, sample_rows)
    sample = unpack_rows(module.qweight[:, :k], bits, cols).T != zeros[g_idx, :k].T  # (k, in) nonzero
    m = max(NM_CANDIDATE_M)
    nm_possible = cols % m == 0 and bool((~sample.reshape(k, cols // m, m)).any(-1).all())
    z = 1 - sample.float().mean().item()  # sampled zero fraction
    if not nm_possible and replace(storage, nnz=int(rows * cols * (1 - 1.5 * z))).bytes > storage.bytes * (
        1 - BITMASK_MIN_SAVING
    ):
        return storage  # neither a pattern nor enough zeros for a bitmask
    codes, zeros = quant_codes(module)
    nonzero = (codes != zeros[g_idx].T).to(torch.uint8)  # (out, in)
    return detect_storage(nonzero, base=storage)
