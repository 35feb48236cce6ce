"""The one small wrapper around gptqmodel: lazy import, CPU settings, our folders, our dtypes.

gptqmodel is heavy (it imports its kernels and prints a banner), so nothing imports it until a
quantized model is quantized or opened. What this module takes care of, measured on a 2-core CPU:
- `GPTQMODEL_CPU_WORKERS` must be at least 2 there, or quantization fails;
- calibration runs in float32 on CPU (gptqmodel picks bf16 for CPU on its own): without AVX-512
  bf16 / AMX an fp32 `F.linear` is several times faster than bf16 (issue 13), and the model a
  stage hands on stays the fp32 one it was given; gptqmodel's Hessian work is fp32 either way
  (on a CPU with AVX-512 bf16 the two took about the same time: `benchmarks/bench_quant.py`);
- quantized models open on CPU through gptqmodel's TORCH_FUSED linear (the only CPU kernel that
  accepts float32 activations); the model then runs in float32 and each quantized linear dispatches
  by row count (`set_kernel`, `FUSED_MAX_ROWS`): up to 32 rows (decoding) go through aten's fused
  int4 kernel `_weight_int4pack_mm_for_cpu` on bf16 activations (output back in float32; with
  float32 activations the same kernel takes a slow path, ~20x slower, which is what an earlier
  measurement saw), more rows (prefill, perplexity, calibration-sized batches) through float32
  `F.linear` on the weight dequantized once (exact values), so perplexity numbers do not move.
  At one row the fused kernel reads 8x fewer weight bytes and is ~7x faster on the bundled model's
  shapes (`benchmarks/bench_quant.py --parts kernels`). `FRANKENLAB_QUANT_KERNEL=exact` (or
  `load_quantized(kernel="exact")`) makes every call exact (bit-exact generations, as before);
  `int4` makes every call fused and frees the float32 copies ("auto" keeps both: 4 bytes per weight
  for the float32 copy plus 0.5 for the packed one). Codes, scales and zero points are kept either
  way and remain what the memory accounting reads;
- masked GPTQ (zeros kept exactly) is `pipeline.quant_mask`;
- it writes `./logs/` relative to the current directory and offloads finished modules to a temp
  folder; both are pointed into the stage's own work folder.

Folders that open (`describe_folder`): a gptqmodel folder (`quantize_config.json`), a gptq stage
folder holding one (`quantized/`), and an EoRA manifest folder (`frankenlab-quant.json`, written by
the eora stage) naming a quantized folder and its adapter.
"""
from __future__ import annotations

import collections
import contextlib
import os
import time
from pathlib import Path
from typing import Iterator

import torch

QUANT_BITS = (2, 3, 4, 8)


def _set_cpu_workers() -> None:
    # gptqmodel's default is about half the cores; on a 2-core machine that is 1 and fails.
    if "GPTQMODEL_CPU_WORKERS" not in os.environ and (os.cpu_count() or 1) < 4:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"


def gptqmodel():
    """The gptqmodel package, imported on first use with our environment."""
    _set_cpu_workers()
    try:
        import gptqmodel as gm
    except ImportError as exc:  # pragma: no cover - depends on the install
        from .config import RecipeError

        raise RecipeError(f"GPTQ/EoRA need the gptqmodel package ({exc}); re-run the README's set-up") from exc
    return gm


@contextlib.contextmanager
def logs_inside(folder: Path) -> Iterator[None]:
    """Point gptqmodel's project-relative `logs/` folder into `folder` for the duration."""
    gptqmodel()
    import gptqmodel.looper.loop_processor as lp

    old = getattr(lp, "_PROJECT_LOG_DIR", None)
    lp._PROJECT_LOG_DIR = Path(folder) / "logs"
    try:
        yield
    finally:
        if old is not None:
            lp._PROJECT_LOG_DIR = old


def quant_dtype(device: torch.device) -> torch.dtype:
    """The dtype quantized models run and calibrate in: float32 on CPU, fp16/bf16 on GPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if not torch.cuda.is_bf16_supported() else torch.bfloat16


def backend_for(device: torch.device, dims_fit_groups: bool, *, bits: int = 4, group_size: int = 128):
    """CPU: TORCH_FUSED (float32 activations) for 4-bit, else the torch kernel; GPU: auto when shapes fit."""
    gm = gptqmodel()
    if device.type != "cuda":
        fused_ok = bits == 4 and group_size in (-1, 16, 32, 64, 128)
        return gm.BACKEND.TORCH_FUSED if fused_ok else gm.BACKEND.GPTQ_TORCH
    if not dims_fit_groups:
        return gm.BACKEND.GPTQ_TORCH
    return gm.BACKEND.AUTO


def _device_arg(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device if device.index is not None else "cuda:0")


def as_calibration(ids: torch.Tensor) -> list[dict]:
    """(samples, seq_len) token ids as gptqmodel's list of {"input_ids", "attention_mask"}."""
    return [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]


def quantize(src_dir: Path, out_dir: Path, calib: torch.Tensor, *, bits: int, group_size: int, desc_act: bool,
             sym: bool, damp_percent: float, batch_size: int, device: torch.device, work_dir: Path,
             on_layer=None, keep_sparsity: bool = False, dtype: torch.dtype | None = None) -> float:
    """GPTQ-quantize the HF folder `src_dir` into `out_dir` (gptqmodel format); returns seconds.

    `keep_sparsity` keeps every exact zero of the weights (masked GPTQ, `pipeline.quant_mask`).
    `dtype` overrides the calibration dtype (float32 on CPU). `on_layer(i, n)` is called whenever
    decoder layer i starts a forward pass (gptqmodel has no progress callback).
    """
    from .quant_mask import masking

    gm = gptqmodel()
    work_dir = Path(work_dir)
    qc = gm.QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                           damp_percent=damp_percent, offload_to_disk=True,
                           offload_to_disk_path=str(work_dir / "offload"))
    t0 = time.perf_counter()
    with logs_inside(work_dir), masking(keep_sparsity):
        model = gm.GPTQModel.load(str(src_dir), qc, device=_device_arg(device), dtype=dtype or quant_dtype(device))
        hooks = _layer_hooks(model.model, on_layer) if on_layer else []
        try:
            model.quantize(as_calibration(calib), batch_size=batch_size)
        finally:
            for h in hooks:
                h.remove()
        model.save(str(out_dir))
    seconds = time.perf_counter() - t0
    del model
    _cleanup(work_dir / "offload")
    return seconds


def _layer_hooks(hf_model: torch.nn.Module, on_layer) -> list:
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if layers is None:
        return []
    n = len(layers)
    return [layer.register_forward_pre_hook(lambda *_a, i=i: on_layer(i, n)) for i, layer in enumerate(layers)]


def load_quantized(path: str | Path, *, device: torch.device | str = "cpu", adapter: str | Path | None = None,
                   rank: int | None = None, dims_fit_groups: bool | None = None, kernel: str | None = None):
    """A gptqmodel model wrapper for a quantized folder; `.model` is the HF causal LM inside.

    `adapter` is an EoRA/LoRA folder written by gptqmodel (applied at every quantized linear).
    On CPU the model runs in float32 and its quantized linears on `kernel` ("auto", "exact" or
    "int4"; default $FRANKENLAB_QUANT_KERNEL, else "auto": see `set_kernel` and the module docstring).
    """
    gm = gptqmodel()
    if torch.device(device).type != "cuda":
        kernel = kernel_choice(kernel)  # a wrong name fails before the slow load
    device = torch.device(device)
    path = Path(path)
    qcfg = _read_json(path / "quantize_config.json")
    if dims_fit_groups is None:
        dims_fit_groups = _dims_fit_groups(path)
    kwargs = {}
    if adapter is not None:
        from gptqmodel.adapter.adapter import Lora

        kwargs["adapter"] = Lora(rank=rank or 0, path=str(adapter))
    backend = backend_for(device, dims_fit_groups, bits=int(qcfg.get("bits", 4)),
                          group_size=int(qcfg.get("group_size", 128)))
    dtype = quant_dtype(device)
    if device.type != "cuda" and backend != gm.BACKEND.TORCH_FUSED:
        dtype = torch.bfloat16  # the torch kernel takes fp16/bf16 only; cast to float32 below
    with logs_inside(path.parent):
        wrapper = gm.GPTQModel.load(str(path), backend=backend, device=_device_arg(device), dtype=dtype, **kwargs)
    if device.type == "cpu":
        eager_dequantize(wrapper.model)
        prepare_for_cpu(wrapper.model, kernel)
    _restore_generation_config(wrapper.model, path)
    return wrapper


def eager_dequantize(model: torch.nn.Module) -> None:
    """Undo the per-module torch.compile of `dequantize_weight` that gptqmodel's torch kernel sets up.

    Each module's compiled function recompiles for every instance (its guards hold per-module
    state) until dynamo's recompile limit: on CPU the first forward took 14-20 s instead of 0.7-1.7 s
    on the tiny model. The eager method is the class's own; only the instance override goes.
    """
    for mod in quantized_linears(model).values():
        mod.__dict__.pop("dequantize_weight", None)


# -- running quantized linears on CPU ------------------------------------------------------------------
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
#   M      1     2     4     8    16    32    64   128
#   idle  ~7x    -   7.0x  3.4x  2.2x  1.7x  1.15x 1.3x   (load ~1.3; M=1: 36.5 ms vs 4.3-5.3 ms)
#   busy  1.3x  3.9x  2.3x  1.6x  2.0x  1.2x  1.0x  1.0x  (load ~3.7, another job on the 2 cores)
# Past 32 rows the gain is small or gone, and prefill, perplexity and calibration-sized batches keep
# the exact path, so their numbers do not move.
FUSED_MAX_ROWS = 32
_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes aten._weight_int4pack_mm_for_cpu accepts
kernel_calls: "collections.Counter[str]" = collections.Counter()  # forwards per path, for tests and benchmarks


def kernel_choice(kernel: str | None = None) -> str:
    """`kernel`, else $FRANKENLAB_QUANT_KERNEL, else "auto"; checked against KERNELS."""
    value = (kernel or os.environ.get(KERNEL_ENV) or "auto").strip().lower()
    if value not in KERNELS:
        raise ValueError(f"quantized kernel must be one of {', '.join(KERNELS)} (got {value!r}; "
                         f"set by ${KERNEL_ENV} or load_quantized(kernel=))")
    return value


def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A quantized linear's forward on CPU (bound per module by `set_kernel`)."""
    kernel = self._frankenlab_kernel
    if kernel == "int4" or (kernel == "auto" and x.numel() <= FUSED_MAX_ROWS * x.shape[-1]
                            and not (x.requires_grad and torch.is_grad_enabled())):
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
    if int(getattr(module, "bits", 0)) != 4 or getattr(module, "planar", False) \
            or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    from .storage import _group_size, quant_codes

    out_f, in_f = int(module.out_features), int(module.in_features)
    try:
        codes, zeros = quant_codes(module)  # (out, in), (groups, out)
    except Exception:  # noqa: BLE001 - a packing we do not read: the exact path serves it
        return None
    g_idx = getattr(module, "g_idx", None)
    g_idx = g_idx.long() if g_idx is not None else torch.arange(in_f) // _group_size(module)
    scales = module.scales.float()
    if weight is None:
        weight = dequantized_weight(module)
    if not torch.equal(scales[g_idx].T * (codes - zeros[g_idx].T).float(), weight):
        return None
    perm = torch.argsort(g_idx, stable=True)
    sorted_groups = g_idx[perm]
    group = next((g for g in _KERNEL_GROUPS if in_f % g == 0
                  and bool((sorted_groups.view(-1, g) == sorted_groups.view(-1, g)[:, :1]).all())), None)
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
    import types

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


def _restore_generation_config(model: torch.nn.Module, path: Path) -> None:
    """gptqmodel's loader turns `do_sample` on; the folder's own generation config says what was saved."""
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.do_sample = False


def generate_eora(native_dir: Path, quant_dir: Path, adapter_dir: Path, calib: torch.Tensor, *, rank: int,
                  batch_size: int, device: torch.device, work_dir: Path, tokenizer=None) -> float:
    """EoRA adapter for `quant_dir` from the pre-quantization model `native_dir`; returns seconds."""
    gm = gptqmodel()
    from gptqmodel.adapter.adapter import Lora

    t0 = time.perf_counter()
    # EoRA stays in bf16 on CPU: gptqmodel's EoRA processor asserts fp16/bf16 weights and its
    # generate() reads the quantized model with TorchLinear, which takes fp16/bf16 only (7.6.0).
    # Reading the quantized model in bf16 and the native one in fp32 runs, but was not faster on
    # the bundled model (108 s fp32 vs 95 s bf16, 8 x 128 tokens, rank 8), so it is not done.
    dtype = quant_dtype(device) if device.type == "cuda" else torch.bfloat16
    with logs_inside(Path(work_dir)):
        gm.GPTQModel.adapter.generate(adapter=Lora(rank=rank, path=str(adapter_dir)),
                                      model_id_or_path=str(native_dir), quantized_model_id_or_path=str(quant_dir),
                                      calibration_dataset=as_calibration(calib), batch_size=batch_size,
                                      tokenizer=tokenizer, dtype=dtype, device=_device_arg(device))
    # The native model is loaded with the quantized folder's config, whose offload folder is the
    # gptq stage's `offload/` (see quantize): remove it again once done.
    _cleanup(Path(quant_dir).parent / "offload")
    return time.perf_counter() - t0


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}


@torch.no_grad()
def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The (out, in) float weight a quantized linear computes with (int codes * scale, minus zero)."""
    cached = getattr(module, "_frankenlab_weight", None)  # dequantized once on CPU (set_kernel)
    if cached is not None:
        return cached
    # gptqmodel's dequantize_weight() is always (in, out); guessing from the shape would leave
    # square matrices (q_proj, o_proj) transposed.
    w = module.dequantize_weight().t()
    return w[: module.out_features, : module.in_features].float()


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _dims_fit_groups(path: Path) -> bool:
    import json

    try:
        cfg = json.loads((path / "config.json").read_text())
        group = int(json.loads((path / "quantize_config.json").read_text()).get("group_size", 128))
    except (OSError, ValueError):
        return False
    if group <= 0:
        return True
    dims = [cfg.get("hidden_size", 0), cfg.get("intermediate_size", 0)]
    return all(d % group == 0 for d in dims)


# -- folders that hold quantized models ------------------------------------------------------------
MANIFEST = "frankenlab-quant.json"


def write_manifest(folder: Path, quantized: Path, *, adapter: Path | None = None, rank: int | None = None,
                   prequant: Path | None = None) -> Path:
    """`folder/frankenlab-quant.json`: which quantized folder (and adapter) this folder stands for.

    Paths are stored relative to `folder` so a run folder can be moved or copied as a whole.
    """
    import json
    import os

    folder = Path(folder)

    def rel(p: Path | None) -> str | None:
        return None if p is None else os.path.relpath(Path(p).resolve(), folder.resolve())

    data = {"format": "gptqmodel", "quantized": rel(quantized), "adapter": rel(adapter),
            "adapter_type": "eora" if adapter is not None else None, "rank": rank, "prequant": rel(prequant)}
    path = folder / MANIFEST
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}, indent=2))
    return path


def describe_folder(path: str | Path) -> dict | None:
    """What a folder holds if it is a quantized model, else None.

    {"kind": "gptq" | "gptq+eora", "quantized": folder, "adapter": folder | None, "rank": int | None,
    "prequant": folder | None}; raises ValueError (with what to do) for a broken manifest.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    manifest = path / MANIFEST
    if manifest.is_file():
        data = _read_json(manifest)
        if not data.get("quantized"):
            raise ValueError(f"{manifest} is not a valid frankenlab quantization manifest (no 'quantized' folder)")

        def resolve(key: str) -> Path | None:
            value = data.get(key)
            return None if not value else (path / value).resolve() if not Path(value).is_absolute() else Path(value)

        qdir, adapter = resolve("quantized"), resolve("adapter")
        if not (qdir / "quantize_config.json").is_file():
            raise ValueError(f"{manifest} names the quantized folder {qdir}, which holds no quantize_config.json "
                             "(was the gptq stage's folder moved or deleted?)")
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise ValueError(f"{manifest} names the adapter folder {adapter}, which holds no adapter_config.json")
        prequant = resolve("prequant") or _sibling_prequant(qdir)
        return {"kind": "gptq+eora" if adapter is not None else "gptq", "quantized": qdir, "adapter": adapter,
                "rank": data.get("rank"), "prequant": prequant}
    for qdir in (path, path / "quantized"):  # a gptqmodel folder, or a gptq stage folder holding one
        if (qdir / "quantize_config.json").is_file() and (qdir / "config.json").is_file():
            return {"kind": "gptq", "quantized": qdir.resolve(), "adapter": None, "rank": None,
                    "prequant": _sibling_prequant(qdir)}
    return None


def _sibling_prequant(qdir: Path) -> Path | None:
    pre = Path(qdir).resolve().parent / "prequant"
    return pre if (pre / "config.json").is_file() else None


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _cleanup(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def saved_folder_problem(artifact: str | None, label: str) -> str | None:
    """Why a later stage cannot resume from a quantization stage's saved folder (None: it can).
    `label` starts the message for a missing folder ("its saved model folder")."""
    try:
        found = describe_folder(artifact) if artifact else None
    except ValueError as exc:
        return str(exc)
    return None if found else f"{label} {artifact} is missing"
