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
Per-tensor formats live in `pipeline/tensor_formats.py`; this module adds them up per model.
Nothing here imports Textual.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from frankenlab.evals.config import require
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.quant_linear import is_quantized_linear
from frankenlab.pipeline.sharing import model_lock
from frankenlab.pipeline.tensor_formats import (
    _DTYPE_NAMES,
    _LAYER,
    _SHORT,
    DECODER_LINEARS,
    Storage,
    _itemsize,
    cached,
    detect_storage,
    dtype_name,
    parse_dtype,
    quantized_storage,
)

DEFAULT_CONTEXT = 512  # the thesis scored rows truncated to 512 tokens
WEIGHT_COMPONENTS = ("embeddings", "head", "attention", "mlp", "norms", "adapters", "other")
RUNTIME_COMPONENTS = ("cache", "activations")


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
    def parse(cls, spec: str) -> Assume:
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
                raise RecipeError(
                    f"what-if {part!r} not understood; use e.g. 2:4, int4-g128, bf16 or combinations like 2:4+int4-g128"
                )
        return cls(nm, quant, dtype)

    @property
    def label(self) -> str:
        parts = (
            ([f"{self.nm[0]}:{self.nm[1]}"] if self.nm else [])
            + ([f"int{self.quant[0]}-g{self.quant[1]}"] if self.quant else [])
            + ([_SHORT.get(self.dtype, self.dtype)] if self.dtype else [])
        )
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

    def assuming(self, assume: Assume) -> Footprint:
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


def kv_cache(
    model: nn.Module, context: int = DEFAULT_CONTEXT, batch: int = 1, dtype: str | None = None
) -> KVCache | None:
    cfg = _model_config(model)
    if cfg is None or not getattr(cfg, "num_attention_heads", None):
        return None
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return KVCache(
        _num_layers(model, cfg), kv_heads, head_dim, context, batch, dtype or dtype_name(_float_dtype(model))
    )


def decode_activation_bytes(
    model: nn.Module, context: int = DEFAULT_CONTEXT, batch: int = 1, dtype: str | None = None
) -> int:
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


def footprint(
    model: nn.Module,
    *,
    context: int = DEFAULT_CONTEXT,
    batch: int = 1,
    kv_dtype: str | None = None,
    assume: Assume | None = None,
) -> Footprint:
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
                # its own tensors are counted with it (under a GPU kernel: repacked parameters, runtime
                # tables, a bias of zeros; the entry reads the saved checkpoint, pipeline.quant_linear.packing)
                for t in [*module._parameters.values(), *module._buffers.values()]:
                    if isinstance(t, torch.Tensor):
                        seen.add(id(t))
                continue
            tensors = [(n, p) for n, p in module._parameters.items() if p is not None]
            tensors += [
                (n, b)
                for n, b in module._buffers.items()
                if b is not None and n not in module._non_persistent_buffers_set
            ]
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
            notes.append(
                f"{quant_modules} GPTQ linears counted as codes + fp16 scales + packed zeros "
                "(g_idx only when act-order makes it non-trivial)"
            )
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
