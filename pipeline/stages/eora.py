"""EoRA (Liu et al. 2024): training-free low-rank compensation of the quantization error.

For every quantized linear, the error W - Q(W) is projected into the eigenspace of the layer's
input activations (from calibration text) and truncated to `rank`, giving a LoRA pair applied
beside the quantized weight at run time. gptqmodel does the work; this stage feeds it the
pre-quantization folder and the quantized folder the preceding gptq stage left on the model
(`model.frankenlab_quant`), saves the adapter in `<stage>/eora` and returns the quantized model
reloaded with the adapter applied. `<stage>/frankenlab-quant.json` names both folders (relative
paths), so the stage folder itself is the artifact: `frankenlab eval --model <stage>`, the lab and
`replay` open it as the quantized model with its adapter applied (`pipeline.loading.load_model`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from frankenlab.evals.config import option, require
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline import quant, quant_folders
from frankenlab.pipeline.context import StageContext, StageResult
from frankenlab.pipeline.quant_linear import quantized_linears

NEEDS_GPTQ = (
    "eora needs a gptq stage before it in the same recipe (it compensates that stage's quantization "
    'error): add [[stages]] kind = "gptq" before the eora stage'
)


@dataclass(frozen=True)
class Config:
    rank: int = option(32, help="rank of the low-rank compensation (EoRA paper: 32)")
    samples: int = option(64, help="calibration windows (EoRA paper: 64 C4 samples)")
    dataset: str = option("c4", form=False, help="calibration text: c4, wikitext2, wiki or a file")
    seq_len: int | None = option(None, form=False, help="calibration window length; empty = the recipe's")
    batch_size: int = option(4, form=False, help="calibration windows per forward")

    def __post_init__(self):
        require(self.rank >= 1, f"rank must be at least 1, got {self.rank}")
        require(self.samples >= 1, f"samples must be at least 1, got {self.samples}")
        from frankenlab.evals.data import DATASETS

        require(
            self.dataset in DATASETS or self.dataset.endswith((".txt", ".jsonl", ".json", ".gz")),
            f"unknown calibration dataset {self.dataset!r}: use c4, wikitext2, wiki, or a .txt/.jsonl file path",
        )
        require(self.seq_len is None or self.seq_len >= 8, "seq_len must be at least 8 tokens")
        require(self.batch_size >= 1, "batch_size must be at least 1")


# -- hooks the registry asks (pipeline/stages/__init__.py) -----------------------------------------
ROLE = "quant"
RUNS_IN_CHILD = True  # gptqmodel's worker threads os._exit(1) on any error: pipeline.child_stage


def needs_calibration(config: Config) -> bool:
    return True


def preflight(config: Config, evaluation, data_dir=None) -> list[str]:
    """Its own calibration text is there, readable, and can give `samples` windows (before weights load)."""
    from frankenlab.pipeline.calibration import CalibrationConfig, check_calibration

    check_calibration(CalibrationConfig(dataset=config.dataset, samples=config.samples), data_dir, key="eora")
    return []


def check_config(config: Config, model_config: dict) -> None:
    """Its own calibration windows no longer than the model takes (the recipe's are checked by the runner)."""
    if config.seq_len:
        from frankenlab.pipeline.calibration import check_seq_len

        check_seq_len(config.seq_len, model_config, key="seq_len")


def describe(params: dict) -> str:
    rank = params.get("rank", params.get("r"))
    return "EoRA" + (f" r{rank}" if rank is not None else "")


def resume_problem(record: dict) -> str | None:
    """A later stage can resume from the saved manifest folder when it still opens."""
    return quant_folders.saved_folder_problem(record.get("artifact"), "its saved model folder")


def check_order(kinds_before: list[str]) -> None:
    require("gptq" in kinds_before, NEEDS_GPTQ)
    require("eora" not in kinds_before, "only one eora stage per recipe")


def run(model: nn.Module, ctx: StageContext, config: Config) -> StageResult:
    info = getattr(model, "frankenlab_quant", None)
    if not info or not Path(info.get("prequant", "")).is_dir():
        raise RecipeError(NEEDS_GPTQ)
    if ctx.work_dir is None:
        raise RecipeError("the eora stage needs a work folder (run it through the runner)")
    smallest = min(min(m.in_features, m.out_features) for m in quantized_linears(model).values())
    require(
        config.rank <= smallest,
        f"rank {config.rank} is larger than the smallest quantized matrix "
        f"dimension ({smallest}); choose rank <= {smallest}",
    )
    work = Path(ctx.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cal = dataclasses.replace(
        ctx.calibration,
        dataset=config.dataset,
        samples=config.samples,
        seq_len=config.seq_len or ctx.calibration.seq_len,
    )
    ids = ctx.calibration_ids(cal)
    ctx.check_cancel()
    adapter = work / "eora"
    qdir = Path(info["quantized"])
    ctx.progress(0.05, f"EoRA rank {config.rank}: {ids.shape[0]} x {ids.shape[1]} calibration tokens")
    seconds = quant.generate_eora(
        Path(info["prequant"]),
        qdir,
        adapter,
        ids,
        rank=config.rank,
        batch_size=config.batch_size,
        device=ctx.device,
        work_dir=work,
        tokenizer=ctx.tokenizer,
    )
    ctx.check_cancel()
    ctx.progress(0.9, "reloading the quantized model with the EoRA adapter")
    wrapper = quant.load_quantized(
        qdir, device=ctx.device, adapter=adapter, rank=config.rank, dims_fit_groups=info.get("dims_fit_groups")
    )
    qmodel = wrapper.model
    qmodel.eval()
    if getattr(model, "generation_config", None) is not None:
        qmodel.generation_config = model.generation_config  # gptqmodel's loader turns do_sample on
    applied = sum(1 for m in quantized_linears(qmodel).values() if getattr(m, "adapter", None) is not None)
    if not applied:
        raise RecipeError(f"the EoRA adapter in {adapter} was not applied to any quantized layer")
    qmodel.frankenlab_quant = {**info, "adapter": str(adapter), "rank": config.rank}
    prequant = Path(info["prequant"]) if info.get("prequant") else None
    quant_folders.write_manifest(work, qdir, adapter=adapter, rank=config.rank, prequant=prequant)
    report = {
        "rank": config.rank,
        "calibration": {"dataset": cal.dataset, "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])},
        "seconds_generate": seconds,
        "adapter_path": str(adapter),
        "adapter_bytes": quant_folders.folder_bytes(adapter),
        "quantized_path": str(qdir),
        "layers_with_adapter": applied,
    }
    ctx.log(
        f"eora: rank {config.rank} adapter on {applied} layers in {seconds:.0f}s "
        f"({report['adapter_bytes'] / 2**20:.1f} MiB)"
    )
    return StageResult(qmodel, report, {"model": str(work), "adapter": str(adapter), "quantized": str(qdir)})
