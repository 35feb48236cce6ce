"""A compact on-disk form whose size is the computed footprint, and its loader.

`save_compact` writes one safetensors file (no pickle) that stores each tensor exactly as
`pipeline.footprint` prices it: N:M matrices as kept values plus packed index bits, unstructured
sparse ones as values plus a 1-bit mask, GPTQ linears as packed integer codes (only the kept ones
when N:M) with fp16 scales and packed zero points, everything else dense. A JSON header in the
safetensors metadata carries the model config and each tensor's layout, so `load_compact`
rebuilds a plain dense Hugging Face model (GPTQ weights dequantized) with the same logits.
The file is for storage and transport: it proves the footprint is real bytes, not a runtime format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from frankenlab.evals.config import require
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.atomic import atomic_path
from frankenlab.pipeline.footprint import Assume, footprint
from frankenlab.pipeline.quant_linear import g_idx_trivial, group_index, is_quantized_linear, packing, quant_codes
from frankenlab.pipeline.tensor_formats import Storage, parse_dtype

COMPACT_FILE = "model.compact.safetensors"
FORMAT = "frankenlab-compact"
VERSION = 1


# -- bit packing -----------------------------------------------------------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes < 2**bits -> a flat uint8 stream, `bits` per code, little-endian within bytes."""
    flat = codes.reshape(-1).to(torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole codes per byte, shift-and-add
        per = 8 // bits
        flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)]).reshape(-1, per)
        out = flat[:, 0].clone()
        for j in range(1, per):
            out |= flat[:, j] << (bits * j)
        return out
    stream = ((flat.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1)  # (numel*bits,)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).reshape(-1, 8)
    out = stream[:, 0].clone()
    for j in range(1, 8):
        out |= stream[:, j] << j
    return out


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: `count` codes as int64."""
    packed = packed.reshape(-1).to(torch.uint8)
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count].long()
    stream = ((packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: count * bits]
    stream = stream.reshape(count, bits).long()
    return (stream << torch.arange(bits)).sum(-1)


# -- N:M index metadata ----------------------------------------------------------------------------
def exact_keep(nonzero: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, groups, m) bool with exactly k True per group: every nonzero, then the first zeros."""
    need = k - nonzero.sum(-1, keepdim=True, dtype=torch.int16)  # zeros to add per group (>= 0)
    zero_rank = torch.cumsum((~nonzero).to(torch.int16), -1, dtype=torch.int16)
    return nonzero | (~nonzero & (zero_rank <= need))


def encode_index(keep: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, str]:
    """Pack a keep-mask (rows, groups, m) in `nm_index_bits(n, m)` bits per group."""
    k = m - n
    b = max(1, (m - 1).bit_length())
    if min(n, k) * b <= m:
        chosen, kind = (keep, "kept") if k <= n else (~keep, "pruned")
        pos = torch.arange(m, dtype=torch.uint8).expand_as(chosen)
        return pack_bits(torch.masked_select(pos, chosen), b), kind  # ascending within each group
    return pack_bits(keep, 1), "mask"


def decode_index(packed: torch.Tensor, kind: str, n: int, m: int, rows: int, groups: int) -> torch.Tensor:
    k = m - n
    b = max(1, (m - 1).bit_length())
    if kind == "mask":
        return unpack_bits(packed, 1, rows * groups * m).bool().reshape(rows, groups, m)
    count = k if kind == "kept" else n
    pos = unpack_bits(packed, b, rows * groups * count).reshape(rows, groups, count)
    chosen = torch.zeros(rows, groups, m, dtype=torch.bool).scatter_(-1, pos, True)
    return chosen if kind == "kept" else ~chosen


# -- encoding one tensor ---------------------------------------------------------------------------
def _encode_float(name: str, w: torch.Tensor, s: Storage, out: dict, layouts: dict) -> None:
    w = w.detach().cpu().contiguous()
    if s.nm:
        n, m = s.nm
        rows, cols = w.shape
        keep = exact_keep((w != 0).reshape(rows, cols // m, m), m - n)
        out[f"{name}::values"] = w.reshape(rows, cols // m, m)[keep].reshape(rows, -1).contiguous()
        out[f"{name}::index"], kind = encode_index(keep, n, m)
        layouts[name] = {"kind": "nm", "n": n, "m": m, "index": kind, "shape": list(w.shape)}
    elif s.nnz is not None:
        mask = w != 0
        out[f"{name}::values"] = w[mask].contiguous()
        out[f"{name}::index"] = pack_bits(mask, 1)
        layouts[name] = {"kind": "bitmask", "shape": list(w.shape)}
    else:
        out[name] = w
        layouts[name] = {"kind": "dense"}


def _encode_quant(name: str, module: nn.Module, s: Storage, out: dict, layouts: dict) -> None:
    bits, group = s.quant
    codes, zeros = quant_codes(module)  # (out, in), (groups, out)
    rows, cols = codes.shape
    g_idx = group_index(module).cpu()
    layout = {"kind": "quant", "bits": bits, "group": group, "shape": [rows, cols], "groups": zeros.shape[0]}
    codes = codes.cpu()
    if s.nm:
        n, m = s.nm
        nonzero = (codes != zeros.cpu()[g_idx].T).reshape(rows, cols // m, m)
        keep = exact_keep(nonzero, m - n)
        out[f"{name}::codes"] = pack_bits(codes.reshape(rows, cols // m, m)[keep], bits)
        out[f"{name}::index"], kind = encode_index(keep, n, m)
        layout.update(n=n, m=m, index=kind)
    elif s.nnz is not None:
        mask = codes != zeros.cpu()[g_idx].T
        out[f"{name}::codes"] = pack_bits(codes[mask], bits)
        out[f"{name}::index"] = pack_bits(mask, 1)
        layout["bitmask"] = True
    else:
        out[f"{name}::codes"] = pack_bits(codes, bits)
    out[f"{name}::zeros"] = pack_bits(zeros.cpu(), bits)
    saved = packing(module)  # the checkpoint's tensors under a GPU kernel (pipeline.quant_linear)
    out[f"{name}::scales"] = saved.scales.detach().cpu().to(torch.float16).contiguous()
    if not g_idx_trivial(module):
        out[f"{name}::g_idx"] = saved.g_idx.detach().cpu().to(torch.int32).contiguous()
    layouts[name] = layout


def _decode(name: str, layout: dict, get) -> torch.Tensor:
    kind = layout["kind"]
    if kind == "dense":
        return get(name)
    rows, cols = layout["shape"]
    if kind == "bitmask":
        mask = unpack_bits(get(f"{name}::index"), 1, rows * cols).bool().reshape(rows, cols)
        values = get(f"{name}::values")
        w = torch.zeros(rows, cols, dtype=values.dtype)
        w[mask] = values
        return w
    if kind == "nm":
        n, m = layout["n"], layout["m"]
        keep = decode_index(get(f"{name}::index"), layout["index"], n, m, rows, cols // m)
        values = get(f"{name}::values")
        w = torch.zeros(rows, cols // m, m, dtype=values.dtype)
        w[keep] = values.reshape(-1)
        return w.reshape(rows, cols)
    require(kind == "quant", f"compact file: unknown tensor layout {kind!r} for {name}")
    bits, group = layout["bits"], layout["group"]
    scales = get(f"{name}::scales").float()  # (groups, out)
    zeros = unpack_bits(get(f"{name}::zeros"), bits, scales.numel()).reshape(scales.shape).float()
    g_idx = get(f"{name}::g_idx").long() if layout.get("has_g_idx") else torch.arange(cols) // group
    if "n" in layout:
        n, m = layout["n"], layout["m"]
        keep = decode_index(get(f"{name}::index"), layout["index"], n, m, rows, cols // m).reshape(rows, cols)
        codes = zeros[g_idx].T.clone()  # pruned positions dequantize to exactly 0
        codes[keep] = unpack_bits(get(f"{name}::codes"), bits, int(keep.sum())).float()
    elif layout.get("bitmask"):
        mask = unpack_bits(get(f"{name}::index"), 1, rows * cols).bool().reshape(rows, cols)
        codes = zeros[g_idx].T.clone()
        codes[mask] = unpack_bits(get(f"{name}::codes"), bits, int(mask.sum())).float()
    else:
        codes = unpack_bits(get(f"{name}::codes"), bits, rows * cols).reshape(rows, cols).float()
    return scales[g_idx].T * (codes - zeros[g_idx].T)  # (out, in)


# -- save / load -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompactReport:
    path: Path
    file_bytes: int
    computed_bytes: int  # weights footprint of the same tensors (pipeline.footprint)
    header_bytes: int = 0  # safetensors + JSON header (config, layouts): fixed cost, ~1 KB per 10 tensors

    @property
    def ratio(self) -> float:
        return self.file_bytes / self.computed_bytes

    @property
    def payload_bytes(self) -> int:
        return self.file_bytes - self.header_bytes

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "file_bytes": self.file_bytes,
            "computed_bytes": self.computed_bytes,
            "header_bytes": self.header_bytes,
            "payload_bytes": self.payload_bytes,
            "ratio": self.ratio,
        }


def header_size(path: str | Path) -> int:
    """Bytes before the tensor data: the 8-byte length plus the JSON header of a safetensors file."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _hf_config(model: nn.Module) -> dict:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    return cfg


def save_compact(model: nn.Module, out_dir: str | Path, *, tokenizer=None, dtype: str | None = None) -> CompactReport:
    """Write out_dir/model.compact.safetensors (atomically); `dtype` casts dense floats (e.g. bfloat16)."""
    from safetensors.torch import save_file

    if any("lora_" in n for n, _ in model.named_parameters()) or any("lora_" in n for n, _ in model.named_buffers()):
        raise RecipeError(
            "the compact form stores plain and GPTQ weights only: merge the LoRA/EoRA adapter into "
            "the model first (the sparsity pattern must be re-applied after a merge)"
        )
    fp = footprint(model, assume=Assume(dtype=dtype) if dtype else None)
    cast = parse_dtype(dtype) if dtype else None
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    layouts: dict[str, dict] = {}
    for e in fp.entries:
        s = e.storage
        if s.quant and not is_quantized_linear(modules.get(e.name.rsplit(".", 1)[0], nn.Module())):
            raise RecipeError(f"{e.name}: a what-if quantized storage cannot be written; run the GPTQ stage")
        if s.quant:
            module = modules[e.name.rsplit(".", 1)[0]]
            _encode_quant(e.name, module, s, out, layouts)
            layouts[e.name]["has_g_idx"] = f"{e.name}::g_idx" in out
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bname = e.name.rsplit(".", 1)[0] + ".bias"
                out[bname], layouts[bname] = bias.detach().cpu().contiguous(), {"kind": "dense"}
            continue
        tensor = _lookup(model, e.name)
        if cast is not None and tensor.is_floating_point():
            tensor = tensor.to(cast)
        _encode_float(e.name, tensor, s, out, layouts)
    dtypes = [t.dtype for t in out.values() if t.is_floating_point() and t.dtype != torch.float16] or [torch.float16]
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": _hf_config(model),
        "tensors": layouts,
        "dtype": str(max(set(dtypes), key=dtypes.count)).replace("torch.", ""),
        "computed_bytes": fp.weights_bytes,
        "formats": fp.formats(),
    }
    out_dir = Path(out_dir)
    with atomic_path(out_dir / COMPACT_FILE) as tmp:
        save_file(out, tmp, metadata={"frankenlab": json.dumps(header)})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    path = out_dir / COMPACT_FILE
    return CompactReport(path, path.stat().st_size, fp.weights_bytes, header_size(path))


def _lookup(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, local = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return getattr(module, local)


def compact_path(path: str | Path) -> Path:
    p = Path(path)
    return p / COMPACT_FILE if p.is_dir() else p


def read_header(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(compact_path(path)), "pt") as f:
        meta = f.metadata() or {}
    require("frankenlab" in meta, f"{path} is not a frankenlab compact file (no frankenlab header)")
    header = json.loads(meta["frankenlab"])
    require(
        header.get("format") == FORMAT and header.get("version") == VERSION,
        f"{path}: unsupported compact format {header.get('format')!r} version {header.get('version')!r}",
    )
    return header


def load_compact(path: str | Path, *, device: str | torch.device = "cpu", dtype: str | None = None) -> nn.Module:
    """Rebuild a dense Hugging Face causal LM from a compact file (or the folder holding it)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    file = compact_path(path)
    require(file.is_file(), f"compact model {str(file)!r} does not exist")
    header = read_header(file)
    cfg = dict(header["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch_dtype = parse_dtype(dtype or header["dtype"])
    try:  # every weight is overwritten below: skip the random initialisation
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {}
    with safe_open(str(file), "pt") as f:
        for name, layout in header["tensors"].items():
            t = _decode(name, layout, f.get_tensor)
            state[name] = t.to(torch_dtype) if t.is_floating_point() else t
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k} if getattr(config, "tie_word_embeddings", False) else set()
    require(
        not (set(missing) - tied) and not unexpected,
        f"{file}: the compact file does not match the model config (missing {sorted(set(missing) - tied)[:5]}, "
        f"unexpected {sorted(unexpected)[:5]})",
    )
    model.tie_weights()
    return model.to(device).eval()
