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

Per layer: `layer_bits = { "0-3" = 8, "4-25" = 4, "26-29" = 16 }` and `layer_group_size` (layer-range
maps, `evals.layer_map`) give named layers their own bits and group size; 16 leaves a layer
unquantized, in the float dtype the model runs in. Layers not named take `bits` / `group_size`.
gptqmodel applies them through `QuantizeConfig.dynamic` (one regex per group of layers that share a
format, `-:` for the unquantized ones), which the saved `quantize_config.json` keeps, so the folder
reopens with each module at its own bits (`pipeline.quant.load_quantized`).

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
from frankenlab.evals.layer_map import IntLayerMap, TextLayerMap
from frankenlab.pipeline import quant, quant_cpu, quant_folders, quant_mask
from frankenlab.pipeline.atomic import atomic_write_text
from frankenlab.pipeline.context import StageContext, StageResult
from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.quant_linear import dequantized_weight, is_quantized_linear, quantized_linears


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
    layer_bits: IntLayerMap | None = option(
        None,
        label="bits per layer",
        help="bits per layer, e.g. 0-3=8, 4-25=4, 26-29=16 (16 = left unquantized, in the model's float "
        "dtype); layers not named take bits",
    )
    layer_group_size: IntLayerMap | None = option(
        None,
        label="group per layer",
        help="group size per layer, e.g. 0-3=64 (-1 = one group per row); layers not named take group size",
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
        if self.layer_bits is not None:
            object.__setattr__(self, "layer_bits", self.layer_bits.map_values(_layer_bits, "layer_bits"))
        if self.layer_group_size is not None:
            groups = self.layer_group_size.map_values(_layer_group, "layer_group_size")
            object.__setattr__(self, "layer_group_size", groups)

    def check_for(self, n_layers: int) -> None:
        """Every layer the maps name exists in the model this stage receives, and at least one
        layer is quantized (before weights load)."""
        for name in ("layer_bits", "layer_group_size"):
            value = getattr(self, name)
            if value is not None:
                value.check_layers(n_layers, name)
        require(
            n_layers == 0 or any(self.layer_format(i) is not None for i in range(n_layers)),
            "layer_bits leaves every layer unquantized (16): remove the gptq stage instead",
        )

    @property
    def mixed(self) -> bool:
        return self.layer_bits is not None or self.layer_group_size is not None

    def layer_format(self, layer: int) -> tuple[int, int] | None:
        """(bits, group_size) of layer `layer`, or None when it stays unquantized (16)."""
        bits = self.layer_bits.for_layer(layer, self.bits) if self.layer_bits is not None else self.bits
        if bits == FLOAT_BITS:
            return None
        group = self.group_size
        if self.layer_group_size is not None:
            group = self.layer_group_size.for_layer(layer, group)
        return bits, group

    def dynamic(self, n_layers: int) -> dict | None:
        """gptqmodel's `QuantizeConfig.dynamic` for a model of `n_layers` decoder layers: one regex per
        set of layers sharing a format other than (bits, group_size), `-:` (skip) for the unquantized."""
        if not self.mixed:
            return None
        by_format: dict = {}
        for i in range(n_layers):
            fmt = self.layer_format(i)
            if fmt != (self.bits, self.group_size):
                by_format.setdefault(fmt, []).append(i)
        out: dict = {}
        for fmt, layers in sorted(by_format.items(), key=lambda kv: kv[1][0]):
            pattern = layer_regex(layers)
            if fmt is None:
                out[f"-:{pattern}"] = {}
            else:
                out[pattern] = {"bits": fmt[0], "group_size": fmt[1]}
        return out or None


FLOAT_BITS = 16  # in layer_bits: the layer is left unquantized


def _layer_bits(value: int, where: str) -> int:
    require(
        value == FLOAT_BITS or value in quant.QUANT_BITS,
        f"{where}: bits must be one of {', '.join(map(str, quant.QUANT_BITS))} or {FLOAT_BITS} "
        f"(left unquantized), got {value}",
    )
    return value


def _layer_group(value: int, where: str) -> int:
    require(
        value == -1 or (value > 0 and value & (value - 1) == 0),
        f"{where}: group_size must be -1 (per row) or a positive power of 2 (32, 64, 128...), got {value}",
    )
    return value


def layer_regex(layers: list[int]) -> str:
    """A regex matching every module inside the decoder layers `layers` (gptqmodel matches from the
    start of the module's full name, e.g. model.layers.3.self_attn.q_proj)."""
    return r"^(?:.*\.)?layers\.(" + "|".join(str(i) for i in sorted(layers)) + r")\."


# -- hooks the registry asks (pipeline/stages/__init__.py) -----------------------------------------
ROLE = "quant"
RUNS_IN_CHILD = True  # gptqmodel's worker threads os._exit(1) on any error: pipeline.child_stage
QUANTIZED = "saved a quantized model that can no longer be opened"


def needs_calibration(config: Config) -> bool:
    return True


def describe(params: dict) -> str:
    bits, group = params.get("bits", 4), params.get("group_size", 128)
    if params.get("layer_bits") or params.get("layer_group_size"):
        return _describe_mixed(params, bits, group)
    return f"GPTQ {bits}-bit" + (f" g{group}" if group not in (None, -1, 0) else "")


def _describe_mixed(params: dict, bits, group) -> str:
    """ "GPTQ mixed 8/4-bit g128 (2 layers 16-bit)": the bit widths the map names (widest first), the
    default's among them; layers it leaves unquantized counted."""
    try:
        bmap = IntLayerMap.parse(params["layer_bits"], "layer_bits") if params.get("layer_bits") else None
    except RecipeError:
        return "GPTQ per layer"
    named = bmap.values() if bmap is not None else []
    widths = sorted({int(b) for b in [*named, bits] if b != FLOAT_BITS}, reverse=True)
    text = f"GPTQ mixed {'/'.join(map(str, widths))}-bit" + (f" g{group}" if group not in (None, -1, 0) else "")
    if params.get("layer_group_size"):
        text += " (groups per layer)"
    left = [i for i in (bmap.layers() if bmap is not None else []) if bmap.for_layer(i) == FLOAT_BITS]
    if left:
        text += f" ({len(left)} layer{'s' if len(left) != 1 else ''} 16-bit)"
    return text


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
    quantized = quantized_linears(qmodel)
    for li, layer in enumerate(decoder_layers(qmodel)):  # a layer left unquantized keeps its float weights
        for name, mod in layer.named_modules():
            full = f"model.layers.{li}.{name}"
            if isinstance(mod, nn.Linear) and full not in quantized and full in zeros_before:
                quantized[full] = mod
    for name, mod in quantized.items():
        w = dequantized_weight(mod) if is_quantized_linear(mod) else mod.weight.detach()  # (out, in)
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
    n_layers = len(decoder_layers(model))
    config.check_for(n_layers)
    formats = [config.layer_format(i) for i in range(n_layers)]
    groups = sorted({f[1] for f in formats if f is not None})
    dims_fit = all(gs == -1 or (hidden % gs == 0 and inter % gs == 0) for gs in groups)
    if not dims_fit and ctx.device.type == "cuda":
        notes.append(
            f"hidden {hidden} / intermediate {inter} not multiples of group size "
            f"{'/'.join(map(str, groups))}: torch kernel"
        )
    dynamic = config.dynamic(n_layers)

    ctx.progress(0.02, "saving the model for gptqmodel")
    prequant = work / "prequant"
    model.save_pretrained(prequant)
    ctx.tokenizer.save_pretrained(prequant)
    ctx.check_cancel()
    qdir = work / "quantized"
    what = describe(config_params(config)) if config.mixed else f"GPTQ {config.bits}-bit, group {g}"
    ctx.progress(0.05, f"{what}: {ids.shape[0]} x {ids.shape[1]} calibration tokens")
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
        dynamic=dynamic,
    )
    masked = quant_mask.stats() if keep else None
    atomic_write_text(
        work / "README.md",
        f"# GPTQ {config.bits}-bit, group size {g}\n\n"
        + (f"Per layer (quantize_config.json's `dynamic`): {_formats_text(formats)}\n\n" if config.mixed else "")
        + "- `quantized/`: gptqmodel format; load with "
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
    if config.mixed:
        qmodel.frankenlab_quant["layer_formats"] = [list(f) if f else None for f in formats]
    report = {
        "bits": config.bits,
        "group_size": g,
        **(
            {
                "by_layer": [
                    {"layer": i, "bits": f[0] if f else FLOAT_BITS, "group_size": f[1] if f else None}
                    for i, f in enumerate(formats)
                ],
                "dynamic": dynamic,
                "layers_unquantized": sum(f is None for f in formats),
            }
            if config.mixed
            else {}
        ),
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
        f"gptq: {_formats_text(formats) if config.mixed else f'{config.bits}-bit g{g}'} in {seconds:.0f}s, "
        f"{report['disk_bytes'] / 2**20:.1f} MiB on disk; "
        f"density {density_before:.4f} -> {sparse['density_after']:.4f}"
        + (f" ({kept:.1%} of zeros kept{', masked' if keep else ''})" if kept is not None else "")
    )
    if not math.isfinite(sparse["density_after"]):
        raise RecipeError("quantized weights could not be read back")
    return StageResult(qmodel, report, {"model": str(qdir), "prequant": str(prequant)})


def config_params(config: Config) -> dict:
    from frankenlab.evals.config import to_dict

    return to_dict(config)


def _formats_text(formats: list) -> str:
    """ "0-1: 8-bit g32, 2-5: 4-bit g32, 6-7: 16-bit (unquantized)": the per-layer formats as ranges."""
    text = {i: f"{f[0]}-bit g{f[1]}" if f else "16-bit (unquantized)" for i, f in enumerate(formats)}
    return ", ".join(f"{k}: {v}" for k, v in TextLayerMap.from_layers(text).to_dict().items())


def _layer_started(ctx, i: int, n: int) -> None:
    """Called as gptqmodel starts decoder layer i (a forward pre-hook: it must return None, or it
    would replace the layer's inputs). A cancel stops the stage between layers."""
    ctx.check_cancel()
    ctx.progress(0.05 + 0.8 * i / n, f"GPTQ layer {i + 1}/{n}")
