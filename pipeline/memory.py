"""How many bytes a model state really needs: per tensor, in the format it is (or would be) stored.

The thesis reported GPU memory and saw no saving from width pruning (2.30 GB dense and pruned
alike): a zeroed weight still costs its full dtype in a dense tensor. Here every tensor is
counted by its storage format, read off the model itself:

- dense: numel x dtype size.
- N:M sparse (thesis notation: N pruned of every M consecutive inputs of a row, K = M - N kept):
  the K kept values per group plus index metadata. Index cost per group is
  `min(min(N, K) * ceil(log2 M), M)` bits: the positions of the smaller of the kept/pruned sets,
  or an M-bit mask when that is cheaper. For 2:4 this is 4 bits per group, i.e. 2 bits per kept
  value: exactly NVIDIA's compressed layout (cuSPARSELt/CUTLASS); for 1:8 it is 3 bits per group.
  Patterns are detected per matrix from its zeros, for M in 2, 4, 8, 16, 32 (the cheapest wins).
- unstructured sparse (zeros without an N:M pattern): kept values plus a 1-bit mask per weight,
  counted only when that saves at least 10 % over dense (or over the best N:M form, which is
  preferred because hardware can use it).
- integer quantization (GPTQ): codes of `bits` each, one fp16 scale and one `bits`-wide zero
  point per group of `group` inputs per output (gptqmodel's qweight/scales/qzeros), plus
  g_idx only when act-order made it non-trivial. Codes equal to the zero point dequantize to
  exactly 0: when they form an N:M pattern (or are many enough for a bitmask) only the kept
  codes are stored. gptqmodel does not keep a pruning mask, so after 2:4 + GPTQ about 99 % of
  the zeros survive but the strict pattern does not; such matrices show as "sparse 50% int4".
- adapters (PEFT LoRA, EoRA buffers): dense, under their own component.
- tied embeddings / lm_head: one storage, counted once.
- KV cache: 2 x layers x kv_heads x head_dim x context x batch x dtype size; activations: the
  live tensors of one decode step (a lower bound without framework overhead).

What-if accounting (`Assume`) re-prices the same tensors as if a planned stage had run
("as if 2:4", "as if int4 g128", "as if bf16"), so the lab can draw bars before running it.
Nothing here imports Textual.
"""
from __future__ import annotations

import math
import re
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .config import RecipeError, require
from .sharing import model_lock

NM_CANDIDATE_M = (2, 4, 8, 16, 32)
BITMASK_MIN_SAVING = 0.10  # unstructured sparsity counts only when the bitmask form saves >= 10 %
DEFAULT_CONTEXT = 512  # the thesis scored rows truncated to 512 tokens
WEIGHT_COMPONENTS = ("embeddings", "head", "attention", "mlp", "norms", "adapters", "other")
RUNTIME_COMPONENTS = ("cache", "activations")
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALE_BYTES = 2  # GPTQ scales are fp16
_LAYER = re.compile(r"\.layers\.(\d+)\.")

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
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


def fmt_bytes(n: float | None) -> str:
    """Binary units, as memory budgets are given (4 MiB, 11 GiB); "-" for an unknown size.

    Two decimals: against a 4 MiB budget, 4.04 MiB must not read as 4.0 MiB.
    """
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


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


def detect_storage(weight: torch.Tensor, *, candidates: tuple[int, ...] = NM_CANDIDATE_M,
                   base: Storage | None = None) -> Storage:
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


# -- GPTQ quantized linears (gptqmodel) ------------------------------------------------------------
def is_quantized_linear(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, b, None), torch.Tensor) for b in ("qweight", "qzeros", "scales"))


def _unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """gptqmodel packing: 32 // bits codes per int32 word along dim 0, lowest bits first."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0] * per, packed.shape[1])[:n]  # (n, cols)


def quant_codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, in), zeros (groups, out)) of a gptqmodel linear with 2/4/8-bit packing."""
    bits = int(module.bits)
    require(bits in (2, 4, 8), f"{bits}-bit GPTQ packing is not supported by the memory accounting")
    out_f, in_f = int(module.out_features), int(module.in_features)
    codes = _unpack_rows(module.qweight, bits, in_f).T  # (out, in)
    zeros = _unpack_rows(module.qzeros.T, bits, out_f).T  # (groups, out)
    return codes, zeros


def g_idx_trivial(module: nn.Module) -> bool:
    g_idx = getattr(module, "g_idx", None)
    if g_idx is None:
        return True
    expect = torch.arange(g_idx.numel(), device=g_idx.device) // _group_size(module)
    return bool(torch.equal(g_idx.long(), expect))


def _group_size(module: nn.Module) -> int:
    g = int(getattr(module, "group_size", -1))
    return g if g > 0 else int(module.in_features)


def quantized_storage(module: nn.Module) -> tuple[Storage, int]:
    """Storage of a gptqmodel linear and the bytes of its real buffers (qweight+qzeros+scales)."""
    bits, group = int(module.bits), _group_size(module)
    shape = (int(module.out_features), int(module.in_features))
    extra = 0
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        extra += bias.numel() * bias.element_size()
    if not g_idx_trivial(module):
        extra += module.g_idx.numel() * module.g_idx.element_size()
    buffers = sum(getattr(module, b).numel() * getattr(module, b).element_size() for b in ("qweight", "qzeros", "scales"))
    storage = Storage(shape, "float16", quant=(bits, group), extra_bytes=extra)
    if bits in (2, 4, 8):
        storage = cached(module.qweight, lambda _q: _quant_sparsity(module, storage))
    return storage, buffers + extra


def _quant_sparsity(module: nn.Module, storage: Storage, sample_rows: int = 64) -> Storage:
    """N:M or bitmask storage of the codes that dequantize to exactly 0 (code == zero point), if cheaper.

    Symmetric 4-bit GPTQ puts 10-15 % of a dense matrix's codes on the zero point, too few to pay
    for any index but enough to defeat a zero-count fast path; a few output rows decide first.
    """
    bits, (rows, cols) = int(module.bits), storage.shape
    g_idx = module.g_idx.long() if getattr(module, "g_idx", None) is not None else \
        torch.arange(cols, device=module.qweight.device) // _group_size(module)
    zeros = _unpack_rows(module.qzeros.T, bits, rows).T  # (groups, out)
    k = min(rows, sample_rows)
    sample = _unpack_rows(module.qweight[:, :k], bits, cols).T != zeros[g_idx, :k].T  # (k, in) nonzero
    m = max(NM_CANDIDATE_M)
    nm_possible = cols % m == 0 and bool((~sample.reshape(k, cols // m, m)).any(-1).all())
    z = 1 - sample.float().mean().item()  # sampled zero fraction
    if not nm_possible and replace(storage, nnz=int(rows * cols * (1 - 1.5 * z))).bytes > \
            storage.bytes * (1 - BITMASK_MIN_SAVING):
        return storage  # neither a pattern nor enough zeros for a bitmask
    codes, zeros = quant_codes(module)
    nonzero = (codes != zeros[g_idx].T).to(torch.uint8)  # (out, in)
    return detect_storage(nonzero, base=storage)


# -- the footprint ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    name: str
    component: str
    storage: Storage
    buffers_bytes: int | None = None  # in-memory bytes of a quantized module's real buffers

    @property
    def bytes(self) -> int:
        return self.storage.bytes


def component_of(name: str) -> str:
    if "lora_" in name or "eora" in name.lower():
        return "adapters"
    if "embed_tokens" in name or "wte" in name:
        return "embeddings"
    if "lm_head" in name:
        return "head"
    if ".self_attn." in name or ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name.lower():
        return "norms"
    return "other"


@dataclass(frozen=True)
class KVCache:
    layers: int
    kv_heads: int
    head_dim: int
    context: int
    batch: int
    dtype: str

    @property
    def bytes(self) -> int:
        size = _itemsize(self.dtype)
        return 2 * self.layers * self.kv_heads * self.head_dim * self.context * self.batch * size


@dataclass(frozen=True)
class Assume:
    """What-if pricing: as if the decoder linears were N:M pruned and/or quantized, dense in dtype."""

    nm: tuple[int, int] | None = None
    quant: tuple[int, int] | None = None
    dtype: str | None = None
    targets: tuple[str, ...] = DECODER_LINEARS

    @classmethod
    def parse(cls, spec: str) -> "Assume":
        """'2:4', 'int4', 'int4-g128', 'bf16', joined with '+': '2:4+int4-g128+bf16'."""
        nm = quant = dtype = None
        for part in (p.strip().lower() for p in spec.split("+") if p.strip()):
            if m := re.fullmatch(r"(\d+):(\d+)", part):
                n, mm = int(m.group(1)), int(m.group(2))
                require(1 <= n < mm, f"what-if {part!r}: N:M needs 1 <= N < M (N of every M pruned)")
                nm = (n, mm)
            elif m := re.fullmatch(r"(?:int|w)(\d+)(?:[-_ ]?g(\d+))?", part):
                bits, group = int(m.group(1)), int(m.group(2) or 128)
                require(1 <= bits <= 8 and group >= 1, f"what-if {part!r}: bits must be 1..8, group >= 1")
                quant = (bits, group)
            elif part in _DTYPE_NAMES:
                dtype = dtype_name(_DTYPE_NAMES[part])
            else:
                raise RecipeError(f"what-if {part!r} not understood; use e.g. 2:4, int4-g128, bf16 or "
                                  "combinations like 2:4+int4-g128")
        return cls(nm, quant, dtype)

    @property
    def label(self) -> str:
        parts = ([f"{self.nm[0]}:{self.nm[1]}"] if self.nm else []) + \
                ([f"int{self.quant[0]}-g{self.quant[1]}"] if self.quant else []) + \
                ([_SHORT.get(self.dtype, self.dtype)] if self.dtype else [])
        return "+".join(parts) or "as is"

    def apply(self, entry: Entry) -> Entry:
        s = entry.storage
        if self.dtype and not s.quant and s.dtype in _DTYPE_NAMES:
            s = replace(s, dtype=self.dtype)
        targeted = any(f".{t}." in entry.name for t in self.targets)
        if entry.component in ("attention", "mlp") and targeted and len(s.shape) == 2:
            if self.nm and s.nm is None and s.nnz is None and s.cols % self.nm[1] == 0:
                s = replace(s, nm=self.nm)
            if self.quant and s.quant is None:
                s = replace(s, quant=self.quant, nnz=None if s.nnz is None else s.nnz)
        return replace(entry, storage=s)


@dataclass
class Footprint:
    entries: list[Entry]
    cache: KVCache | None = None
    activation_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    assumed: str = "as is"

    @property
    def weights_bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    @property
    def runtime_bytes(self) -> int:
        return (self.cache.bytes if self.cache else 0) + self.activation_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.runtime_bytes

    def components(self) -> dict[str, int]:
        out = {c: 0 for c in WEIGHT_COMPONENTS}
        for e in self.entries:
            out[e.component] = out.get(e.component, 0) + e.bytes
        out["cache"] = self.cache.bytes if self.cache else 0
        out["activations"] = self.activation_bytes
        return out

    def by_layer(self) -> list[int]:
        """Weight bytes of each decoder layer (index in the model's layer list), for per-layer bars."""
        out: dict[int, int] = {}
        for e in self.entries:
            if m := _LAYER.search(e.name):
                out[int(m.group(1))] = out.get(int(m.group(1)), 0) + e.bytes
        return [out.get(i, 0) for i in range(max(out) + 1)] if out else []

    def formats(self) -> dict[str, int]:
        """Storage label -> number of tensors (e.g. {'2:4 fp32': 210, 'fp32': 61})."""
        return dict(Counter(e.storage.label for e in self.entries))

    def overhead(self) -> dict[str, int]:
        """Bytes by part (values, index metadata, scales/zeros, extra) over all weights."""
        out: Counter = Counter()
        for e in self.entries:
            out.update(e.storage.parts())
        return dict(out)

    def assuming(self, assume: Assume) -> "Footprint":
        entries = [assume.apply(e) for e in self.entries]
        cache = replace(self.cache, dtype=assume.dtype) if self.cache and assume.dtype else self.cache
        act = self.activation_bytes
        if assume.dtype and self.cache:
            act = self.activation_bytes * _itemsize(assume.dtype) // _itemsize(self.cache.dtype)
        return Footprint(entries, cache, act, list(self.notes), assume.label)

    def to_dict(self) -> dict:
        return {
            "assumed": self.assumed,
            "components": self.components(),
            "weights_bytes": self.weights_bytes,
            "runtime_bytes": self.runtime_bytes,
            "total_bytes": self.total_bytes,
            "parts": self.overhead(),
            "formats": self.formats(),
            "layers": self.by_layer(),
            "cache": None if self.cache is None else {**self.cache.__dict__, "bytes": self.cache.bytes},
            "notes": list(self.notes),
        }


def _model_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return getattr(cfg, "text_config", None) or cfg


def _num_layers(model: nn.Module, cfg) -> int:
    for holder in (model, getattr(model, "model", None), getattr(getattr(model, "base_model", None), "model", None)):
        layers = getattr(getattr(holder, "model", None), "layers", None)
        if isinstance(layers, nn.ModuleList):
            return len(layers)  # a layer plan's slots each hold their own cache entry
    return int(getattr(cfg, "num_hidden_layers", 0) or 0)


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.float32


def kv_cache(model: nn.Module, context: int = DEFAULT_CONTEXT, batch: int = 1, dtype: str | None = None) -> KVCache | None:
    cfg = _model_config(model)
    if cfg is None or not getattr(cfg, "num_attention_heads", None):
        return None
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return KVCache(_num_layers(model, cfg), kv_heads, head_dim, context, batch, dtype or dtype_name(_float_dtype(model)))


def decode_activation_bytes(model: nn.Module, context: int = DEFAULT_CONTEXT, batch: int = 1,
                            dtype: str | None = None) -> int:
    """Live tensors of one decode step: residual + the larger of the attention / MLP / logits phase."""
    cfg = _model_config(model)
    if cfg is None or not getattr(cfg, "hidden_size", None):
        return 0
    h, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hd = int(getattr(cfg, "head_dim", None) or h // heads)
    inter = int(getattr(cfg, "intermediate_size", 4 * h))
    attention = h + 2 * heads * hd + 2 * kv * hd + heads * context  # normed x, q, k, v, scores, out
    mlp = h + 3 * inter  # normed x, gate, up, act(gate)*up
    logits = int(getattr(cfg, "vocab_size", 0))
    size = parse_dtype(dtype).itemsize if dtype else _float_dtype(model).itemsize
    return batch * (h + max(attention, mlp, logits)) * size


def footprint(model: nn.Module, *, context: int = DEFAULT_CONTEXT, batch: int = 1, kv_dtype: str | None = None,
              assume: Assume | None = None) -> Footprint:
    """Per-tensor storage of every parameter and persistent buffer, tied storage counted once."""
    with model_lock(model):  # planned() swaps the layer list and the config's depth: read the model alone
        entries: list[Entry] = []
        notes: list[str] = []
        seen: set[int] = set()
        quant_modules = 0
        names_by_storage: dict = {}
        for mod_name, module in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            if is_quantized_linear(module):
                quant_modules += 1
                storage, buffers = quantized_storage(module)
                entries.append(Entry(f"{prefix}weight", component_of(prefix + "weight"), storage, buffers))
                for b in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                    t = getattr(module, b, None)
                    if isinstance(t, torch.Tensor):
                        seen.add(id(t))
            tensors = [(n, p) for n, p in module._parameters.items() if p is not None]
            tensors += [(n, b) for n, b in module._buffers.items()
                        if b is not None and n not in module._non_persistent_buffers_set]
            for local, t in tensors:
                name = prefix + local
                key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.device.type != "meta" else id(t)
                first = names_by_storage.get(id(t)) or (names_by_storage.get(key) if t.numel() else None)
                if first is not None:
                    notes.append(f"{name} is tied to {first}: counted once")
                    continue
                if id(t) in seen:  # a quantized module's own buffer, counted with the module
                    continue
                seen.add(id(t))
                names_by_storage[id(t)] = names_by_storage[key] = name
                entries.append(Entry(name, component_of(name), cached(t, lambda x: detect_storage(x.detach()))))
        if quant_modules:
            notes.append(f"{quant_modules} GPTQ linears counted as codes + fp16 scales + packed zeros "
                         "(g_idx only when act-order makes it non-trivial)")
        if any(e.storage.nm == (2, 4) for e in entries):
            notes.append("2:4 counted in NVIDIA's compressed layout: kept values + 2-bit index per kept value")
        if any(e.storage.nm and e.storage.nm != (2, 4) for e in entries):
            notes.append("N:M (N of every M pruned) index cost: min(min(N, M-N) * ceil(log2 M), M) bits per group")
        cache = kv_cache(model, context, batch, kv_dtype)
        act = decode_activation_bytes(model, context, batch, kv_dtype)
    fp = Footprint(entries, cache, act, notes)
    return fp.assuming(assume) if assume else fp


# planned-stage bars: dense parts of a GPTQ model stay 16-bit, so the int4 cases assume bf16 too
WHAT_IFS = ("bf16", "2:4+bf16", "int4-g128+bf16", "2:4+int4-g128+bf16")


def footprint_summary(model: nn.Module, *, context: int = DEFAULT_CONTEXT, batch: int = 1) -> dict:
    """JSON-able footprint for a session stage record, with what-if weight totals for planning."""
    fp = footprint(model, context=context, batch=batch)
    out = fp.to_dict()
    out["what_if_weights_bytes"] = {spec: fp.assuming(Assume.parse(spec)).weights_bytes for spec in WHAT_IFS}
    out["convention"] = "N:M = N pruned of every M (thesis notation); sizes in bytes"
    return out
