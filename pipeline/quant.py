"""The one small wrapper around gptqmodel: lazy import, CPU settings, our folders, our dtypes.

gptqmodel is heavy (it imports its kernels and prints a banner), so nothing imports it until a
GPTQ or EoRA stage runs. What this module takes care of, measured on a 2-core CPU:
- `GPTQMODEL_CPU_WORKERS` must be at least 2 there, or quantization fails;
- its `TorchLinear` kernel (the only CPU kernel, and the one that accepts dimensions that are not a
  multiple of the group size, e.g. SmolLM2's 576) runs in float16/bfloat16 only, so quantized
  models are loaded in bfloat16 on CPU;
- it writes `./logs/` relative to the current directory and offloads finished modules to a temp
  folder; both are pointed into the stage's own work folder.
"""
from __future__ import annotations

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
    """The dtype quantized models run in: gptqmodel's torch kernel takes fp16/bf16 only."""
    return torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16


def backend_for(device: torch.device, dims_fit_groups: bool):
    """Torch kernel on CPU or when a dimension is not a multiple of the group size, else auto."""
    gm = gptqmodel()
    if device.type != "cuda" or not dims_fit_groups:
        return gm.BACKEND.GPTQ_TORCH
    return gm.BACKEND.AUTO


def _device_arg(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device if device.index is not None else "cuda:0")


def as_calibration(ids: torch.Tensor) -> list[dict]:
    """(samples, seq_len) token ids as gptqmodel's list of {"input_ids", "attention_mask"}."""
    return [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]


def quantize(src_dir: Path, out_dir: Path, calib: torch.Tensor, *, bits: int, group_size: int, desc_act: bool,
             sym: bool, damp_percent: float, batch_size: int, device: torch.device, work_dir: Path,
             on_layer=None) -> float:
    """GPTQ-quantize the HF folder `src_dir` into `out_dir` (gptqmodel format); returns seconds.

    `on_layer(i, n)` is called whenever decoder layer i starts a forward pass (gptqmodel has no
    progress callback; its layer-by-layer loop is the progress there is).
    """
    gm = gptqmodel()
    work_dir = Path(work_dir)
    qc = gm.QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                           damp_percent=damp_percent, offload_to_disk=True,
                           offload_to_disk_path=str(work_dir / "offload"))
    t0 = time.perf_counter()
    with logs_inside(work_dir):
        model = gm.GPTQModel.load(str(src_dir), qc, device=_device_arg(device), dtype=quant_dtype(device))
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
                   rank: int | None = None, dims_fit_groups: bool | None = None):
    """A gptqmodel model wrapper for a quantized folder; `.model` is the HF causal LM inside.

    `adapter` is an EoRA/LoRA folder written by gptqmodel (applied at every quantized linear).
    """
    gm = gptqmodel()
    device = torch.device(device)
    if dims_fit_groups is None:
        dims_fit_groups = _dims_fit_groups(Path(path))
    kwargs = {}
    if adapter is not None:
        from gptqmodel.adapter.adapter import Lora

        kwargs["adapter"] = Lora(rank=rank or 0, path=str(adapter))
    with logs_inside(Path(path).parent):
        wrapper = gm.GPTQModel.load(str(path), backend=backend_for(device, dims_fit_groups),
                                    device=_device_arg(device), dtype=quant_dtype(device), **kwargs)
    if device.type == "cpu":
        eager_dequantize(wrapper.model)
    return wrapper


def eager_dequantize(model: torch.nn.Module) -> None:
    """Undo the per-module torch.compile of `dequantize_weight` that gptqmodel's torch kernel sets up.

    Each module's compiled function recompiles for every instance (its guards hold per-module
    state) until dynamo's recompile limit: on CPU the first forward took 14-20 s instead of 0.7-1.7 s
    on the tiny model. The eager method is the class's own; only the instance override goes.
    """
    for mod in quantized_linears(model).values():
        mod.__dict__.pop("dequantize_weight", None)


def generate_eora(native_dir: Path, quant_dir: Path, adapter_dir: Path, calib: torch.Tensor, *, rank: int,
                  batch_size: int, device: torch.device, work_dir: Path, tokenizer=None) -> float:
    """EoRA adapter for `quant_dir` from the pre-quantization model `native_dir`; returns seconds."""
    gm = gptqmodel()
    from gptqmodel.adapter.adapter import Lora

    t0 = time.perf_counter()
    with logs_inside(Path(work_dir)):
        gm.GPTQModel.adapter.generate(adapter=Lora(rank=rank, path=str(adapter_dir)),
                                      model_id_or_path=str(native_dir), quantized_model_id_or_path=str(quant_dir),
                                      calibration_dataset=as_calibration(calib), batch_size=batch_size,
                                      tokenizer=tokenizer, dtype=quant_dtype(device), device=_device_arg(device))
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
    # gptqmodel's dequantize_weight() is always (in, out); guessing from the shape would leave
    # square matrices (q_proj, o_proj) transposed.
    w = module.dequantize_weight().t()
    return w[: module.out_features, : module.in_features].float()


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


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _cleanup(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
