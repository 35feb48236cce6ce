"""GPTQ weight quantization through gptqmodel: 4-bit, group size 128 by default.

The in-memory model (perhaps depth-pruned, width-pruned, LoRA-merged) is saved as a plain HF
folder `<stage>/prequant` (EoRA needs it later), quantized with calibration windows into
`<stage>/quantized` (gptqmodel's format, loadable with `pipeline.quant.load_quantized`), and
reloaded so the runner evaluates what was saved. On CPU calibration runs in float32 and the
reloaded model decodes through the fused int4 kernel and computes prefill and perplexity with its
weights dequantized once to float32 (`pipeline.quant_cpu`, `FRANKENLAB_QUANT_KERNEL`).

Sparse weights: GPTQ gives every weight a `bits`-bit code and spreads each column's rounding
error over the columns not yet quantized, so unmasked, a pruned (zero) weight stays zero only when
its code lands exactly on the group's zero point. With `keep_sparsity` (the default; it matters
only when the model has exact zeros) the error is propagated onto kept weights only and pruned
weights stay exactly zero (`pipeline.quant_mask`). The report measures it on the dequantized
weights: `pattern_holds` (every former zero is still zero), density after, share of zeros kept.
Those statistics are computed on the CPU from the saved checkpoint's codes whenever the reloaded
model runs on a GPU kernel (`pipeline.quant_linear.packing`), against the zero masks kept on the CPU.

Handing over to EoRA: the returned model carries `frankenlab_quant` (a dict with the quantized
and pre-quantization folders and the settings), which the eora stage reads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from frankenlab.evals.config import option, require
from frankenlab.evals.devices import dtype_name
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline import quant, quant_cpu, quant_folders, quant_mask
from frankenlab.pipeline.atomic import atomic_write_text
from frankenlab.pipeline.context import StageContext, StageResult
from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.quant_linear import dequantized_weight, quantized_linears


@dataclass(frozen=True)
class Config:
    bits: int = option(4, choices=quant.QUANT_BITS, help="bits per weight")
    group_size: int = option(128, label="group size", help="weights sharing one scale and zero; -1 = one group per row")
    desc_act: bool = option(
        False, form=False, help="quantize columns in order of activation size (slower, sometimes better)"
    )
    sym: bool = option(True, form=False, help="symmetric quantization (zero point in the middle)")
    damp_percent: float = option(0.05, form=False, help="dampening added to the Hessian diagonal")
    samples: int | None = option(None, help="calibration windows; empty = the recipe's calibration samples")
    seq_len: int | None = option(None, form=False, help="calibration window length; empty = the recipe's")
    batch_size: int = option(4, form=False, help="calibration windows per forward")
    keep_sparsity: bool = option(
        True,
        label="keep sparsity",
        help="keep pruned weights exactly zero (masked GPTQ); only matters when the "
        "model has zeros (after width pruning)",
    )

    def __post_init__(self):
        require(
            self.bits in quant.QUANT_BITS,
            f"bits must be one of {', '.join(map(str, quant.QUANT_BITS))}, got {self.bits}",
        )
        g = self.group_size
        require(
            g == -1 or (g > 0 and g & (g - 1) == 0),
            f"group_size must be -1 (per row) or a positive power of 2 (32, 64, 128...), got {g}",
        )
        require(0.0 < self.damp_percent < 1.0, f"damp_percent must be between 0 and 1, got {self.damp_percent}")
        require(self.samples is None or self.samples >= 1, "samples must be at least 1")
        require(self.seq_len is None or self.seq_len >= 8, "seq_len must be at least 8 tokens")
        require(self.batch_size >= 1, "batch_size must be at least 1")


# -- hooks the registry asks (pipeline/stages/__init__.py) -----------------------------------------
ROLE = "quant"
RUNS_IN_CHILD = True  # gptqmodel's worker threads os._exit(1) on any error: pipeline.child_stage
QUANTIZED = "saved a quantized model that can no longer be opened"


def needs_calibration(config: Config) -> bool:
    return True


def describe(params: dict) -> str:
    bits, group = params.get("bits", 4), params.get("group_size", 128)
    return f"GPTQ {bits}-bit" + (f" g{group}" if group not in (None, -1, 0) else "")


def resume_problem(record: dict) -> str | None:
    """A later stage can resume from the saved quantized folder when it is still there."""
    return quant_folders.saved_folder_problem(record.get("artifact"), f"{QUANTIZED}: its folder")


def check_order(kinds_before: list[str]) -> None:
    require("gptq" not in kinds_before, "the model is already quantized by an earlier gptq stage; keep one")


def calibration_for(ctx: StageContext, samples: int | None, seq_len: int | None):
    cal = ctx.calibration
    cal = dataclasses.replace(cal, samples=samples or cal.samples, seq_len=seq_len or cal.seq_len)
    return ctx.calibration_ids(cal), cal


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where the decoder's linear weights are zero now (only for matrices that have zeros)."""
    out = {}
    for li, layer in enumerate(decoder_layers(model)):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                zero = mod.weight.detach() == 0
                if bool(zero.any()):
                    out[f"model.layers.{li}.{name}"] = zero.cpu()
    return out


def _linear_count(model: nn.Module) -> int:
    return sum(
        mod.weight.numel() for layer in decoder_layers(model) for mod in layer.modules() if isinstance(mod, nn.Linear)
    )


def sparsity_after(qmodel: nn.Module, zeros_before: dict[str, torch.Tensor]) -> dict:
    """Density of the dequantized weights and how many former zeros survived quantization.

    `zeros_before` is on the CPU; so are the weights read here (the saved checkpoint's under a GPU
    kernel), and a weight a torch kernel dequantizes on its GPU comes to the CPU as its zero mask."""
    nz = total = kept = 0
    for name, mod in quantized_linears(qmodel).items():
        w = dequantized_weight(mod)  # (out, in)
        zero = (w == 0).cpu()
        nz += int((~zero).sum())
        total += w.numel()
        before = zeros_before.get(name)
        if before is not None and before.shape == zero.shape:
            kept += int((zero & before).sum())
    was = sum(int(z.sum()) for z in zeros_before.values())
    return {
        "density_after": nz / total if total else 1.0,
        "zeros_before": was,
        "zeros_kept_fraction": kept / was if was else None,
        "pattern_holds": kept == was if was else None,
    }


def run(model: nn.Module, ctx: StageContext, config: Config) -> StageResult:
    from frankenlab.pipeline.lora_adapters import is_peft, merge_keeping_mask

    if ctx.work_dir is None:
        raise RecipeError("the gptq stage needs a work folder (run it through the runner)")
    work = Path(ctx.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    notes = []
    if is_peft(model):
        model, remasked = merge_keeping_mask(model)
        notes.append(f"unmerged LoRA adapter merged before quantizing (mask re-applied on {remasked} matrices)")
    ctx.check_cancel()
    zeros_before = _zero_masks(model)
    total_before = _linear_count(model)
    density_before = 1 - sum(int(z.sum()) for z in zeros_before.values()) / total_before
    ids, cal = calibration_for(ctx, config.samples, config.seq_len)
    hidden = model.config.hidden_size
    inter = getattr(model.config, "intermediate_size", hidden)
    g = config.group_size
    dims_fit = g == -1 or (hidden % g == 0 and inter % g == 0)
    if not dims_fit and ctx.device.type == "cuda":
        notes.append(f"hidden {hidden} / intermediate {inter} not multiples of group size {g}: torch kernel")

    ctx.progress(0.02, "saving the model for gptqmodel")
    prequant = work / "prequant"
    model.save_pretrained(prequant)
    ctx.tokenizer.save_pretrained(prequant)
    ctx.check_cancel()
    qdir = work / "quantized"
    ctx.progress(0.05, f"GPTQ {config.bits}-bit, group {g}: {ids.shape[0]} x {ids.shape[1]} calibration tokens")
    keep = config.keep_sparsity and bool(zeros_before)
    seconds = quant.quantize(
        prequant,
        qdir,
        ids,
        bits=config.bits,
        group_size=g,
        desc_act=config.desc_act,
        sym=config.sym,
        damp_percent=config.damp_percent,
        batch_size=config.batch_size,
        device=ctx.device,
        work_dir=work,
        keep_sparsity=keep,
        on_layer=lambda i, n: _layer_started(ctx, i, n),
    )
    masked = quant_mask.stats() if keep else None
    atomic_write_text(
        work / "README.md",
        f"# GPTQ {config.bits}-bit, group size {g}\n\n- `quantized/`: gptqmodel format; load with "
        "`frankenlab eval --model` on this folder, `pipeline.loading.load_model(path)` or `GPTQModel.load(path)`.\n"
        "- `prequant/`: the model as it entered this stage (plain HF folder; EoRA's input).\n"
        "- `logs/`: gptqmodel's per-module quantization log.\n",
    )
    ctx.check_cancel()
    ctx.progress(0.9, "reloading the quantized model")
    wrapper = quant.load_quantized(qdir, device=ctx.device, dims_fit_groups=dims_fit)
    qmodel = wrapper.model
    qmodel.eval()
    if getattr(model, "generation_config", None) is not None:
        qmodel.generation_config = model.generation_config  # gptqmodel's loader turns do_sample on
    sparse = sparsity_after(qmodel, zeros_before)
    if keep and not sparse["pattern_holds"]:
        raise RecipeError(
            "masked GPTQ left pruned weights nonzero; set keep_sparsity = false to quantize "
            "without the mask, and report this as a bug"
        )
    qmodel.frankenlab_quant = {
        "quantized": str(qdir),
        "prequant": str(prequant),
        "bits": config.bits,
        "group_size": g,
        "dims_fit_groups": dims_fit,
    }
    report = {
        "bits": config.bits,
        "group_size": g,
        "desc_act": config.desc_act,
        "sym": config.sym,
        "calibration": {"dataset": cal.dataset, "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])},
        "kernel": (
            f"CPU: calibration in float32; inference kernel {qmodel.frankenlab_kernel}: "
            f"{quant_cpu.KERNEL_NOTES[qmodel.frankenlab_kernel]}"
            if ctx.device.type != "cuda"
            else f"CUDA: calibration in {dtype_name(quant.quant_dtype(ctx.device))}; inference kernel "
            f"{quant.kernel_description(qmodel)}; statistics read from the saved checkpoint on CPU"
        ),
        "backend": getattr(qmodel, "frankenlab_backend", None),
        "keep_sparsity": keep,
        "masked": masked,
        "seconds_quantize": seconds,
        "disk_bytes": quant_folders.folder_bytes(qdir),
        "prequant_disk_bytes": quant_folders.folder_bytes(prequant),
        "quantized_path": str(qdir),
        "prequant_path": str(prequant),
        "quantized_linears": len(quantized_linears(qmodel)),
        "density_before": density_before,
        **sparse,
        "sparsity_note": (
            (
                "masked GPTQ: rounding error propagated onto kept weights only, pruned weights kept exactly zero. "
                if keep
                else "GPTQ re-codes every weight and spreads rounding error over later columns; a pruned "
                "weight stays zero only when its code equals the group's zero point. "
            )
            + "Densities are measured on the dequantized weights of the decoder's linear layers."
        ),
        "notes": notes,
    }
    kept = sparse["zeros_kept_fraction"]
    ctx.log(
        f"gptq: {config.bits}-bit g{g} in {seconds:.0f}s, {report['disk_bytes'] / 2**20:.1f} MiB on disk; "
        f"density {density_before:.4f} -> {sparse['density_after']:.4f}"
        + (f" ({kept:.1%} of zeros kept{', masked' if keep else ''})" if kept is not None else "")
    )
    if not math.isfinite(sparse["density_after"]):
        raise RecipeError("quantized weights could not be read back")
    return StageResult(qmodel, report, {"model": str(qdir), "prequant": str(prequant)})


def _layer_started(ctx, i: int, n: int) -> None:
    """Called as gptqmodel starts decoder layer i (a forward pre-hook: it must return None, or it
    would replace the layer's inputs). A cancel stops the stage between layers."""
    ctx.check_cancel()
    ctx.progress(0.05 + 0.8 * i / n, f"GPTQ layer {i + 1}/{n}")
