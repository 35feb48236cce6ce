"""What the runner checks before a run and how it describes one: the preflight checks (data the
recipe reads, stage hooks, sequence lengths against the model's config.json, all before any weights
load; `frankenlab sweep` runs the same ones for every configuration), the run's environment record,
and the one-line message for an OSError while writing a run. Kept apart from `pipeline.runner` so
the runner module holds only the act of running, and sweeps can check inputs without it.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from frankenlab.evals.errors import ModelLoadError, RecipeError
from frankenlab.evals.suite import check_data, check_lengths
from frankenlab.pipeline.calibration import check_calibration, check_seq_len
from frankenlab.pipeline.loading import LoadedModel, resolve_source
from frankenlab.pipeline.recipe import Recipe
from frankenlab.pipeline.stages import stage_kind


def environment(loaded: LoadedModel | None, recipe: Recipe) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "seed": recipe.calibration.seed,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    for pkg in ("peft", "gptqmodel", "datasets"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - optional packages
            env[pkg] = None
    if loaded is not None:
        env["device"] = str(loaded.device)
        env["dtype"] = str(loaded.dtype).replace("torch.", "")
        if loaded.device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(loaded.device)
            # the gptqmodel kernel quantized models run on this GPU (evals.devices.cuda_quant_kernel);
            # a model it cannot run falls back to "torch", which the gptq stage's report says
            from frankenlab.evals.devices import DeviceError, cuda_quant_kernel_choice

            try:
                env["quant_kernel"] = getattr(loaded.model, "frankenlab_backend", None) or cuda_quant_kernel_choice()
            except DeviceError:
                env["quant_kernel"] = None
        else:  # how quantized linears run on CPU (decoding fused int4 or exact): pipeline.quant_cpu.set_kernel
            from frankenlab.pipeline.quant_cpu import kernel_choice

            try:
                env["quant_kernel"] = kernel_choice()
            except ValueError:
                env["quant_kernel"] = None
    return env


def needs_calibration(recipe: Recipe) -> bool:
    return any(stage_kind(s.kind).needs_calibration(s.config) for s in recipe.stages)


def check_recipe_data(recipe: Recipe, data_dir: Path | None) -> None:
    """Every data file the run reads is there and readable, every row of it usable (DataNotFound,
    DataError), and it holds what the recipe asks of it (RecipeError: more TriviaQA questions than
    the file, more calibration windows than the text can give), all before any weights load."""
    if needs_calibration(recipe):  # calibration text first: a missing c4 is named before the evaluation data
        check_calibration(recipe.calibration, data_dir)
    if recipe.evaluation.after != "none":
        check_data(recipe.evaluation, data_dir)


def check_sizes(recipe: Recipe, model_cfg: dict | None) -> None:
    """Sequence lengths the model cannot take (its config.json's max_position_embeddings), refused
    before any weights load: perplexity protocols and the calibration windows."""
    if recipe.evaluation.after != "none":
        check_lengths(recipe.evaluation, model_cfg)
    if needs_calibration(recipe):
        check_seq_len(recipe.calibration.seq_len, model_cfg)


def preflight(recipe: Recipe, data_dir: Path | None, seen: set | None = None) -> list[str]:
    """Fail before any heavy work when data the run will need cannot be found or read or cannot give
    what is asked of it (`check_recipe_data`), or when a stage refuses the recipe (its `preflight`
    hook: LoRA training data that holds evaluated questions). `seen` (a sweep checking many recipes)
    skips a stage hook already asked about the same stage config and evaluation."""
    check_recipe_data(recipe, data_dir)
    warnings = []
    for i, s in enumerate(recipe.stages, 1):  # e.g. LoRA: its training data holds nothing evaluated
        if seen is not None:
            key = (s.kind, repr(s.config), repr(recipe.evaluation))
            if key in seen:
                continue
            seen.add(key)
        try:
            warnings += [
                f"stage {i} ({s.kind}): {w}"
                for w in stage_kind(s.kind).preflight(s.config, recipe.evaluation, data_dir)
            ]
        except RecipeError as exc:
            err = RecipeError(f"stage {i} ({s.kind}): {exc}")
            err.stage = i
            raise err from None
    return warnings


def model_config(source_ref: str) -> dict | None:
    """The model's config.json as a dict, without loading weights (None when it cannot be read here:
    loading then says why)."""
    from frankenlab.pipeline.checkpoint_check import read_config

    try:
        return read_config(resolve_source(source_ref).path)
    except (ModelLoadError, TypeError):  # TypeError: a source with no local folder
        return None


def config_depth(cfg: dict | None) -> int | None:
    """Number of decoder layers a config.json dict declares (None when it says none)."""
    try:
        return int(cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers"))
    except (AttributeError, TypeError, ValueError):
        return None


def model_depth(source_ref: str) -> int | None:
    """Number of decoder layers from config.json, without loading weights."""
    return config_depth(model_config(source_ref))


def write_problem(exc: OSError, out: Path) -> str:
    """One line for an OSError while writing a run: what happened and what to do."""
    import errno

    from frankenlab.pipeline.atomic import UnsafeOutputPath

    if isinstance(exc, UnsafeOutputPath):  # a symbolic link or a path outside the folder: says what to do
        return str(exc)
    where = Path(exc.filename).absolute() if isinstance(exc.filename, str) else None
    if exc.errno == errno.EACCES and where is not None and Path(out).absolute() not in (where, *where.parents):
        from frankenlab.pipeline.checkpoint_check import unreadable

        return unreadable(where, exc)  # reading a data file or model, not writing the run
    if exc.errno == errno.ENOSPC:
        return (
            f"cannot write the run folder {out}: the disk is full; free some space or choose another "
            "folder (--out DIR); finished stages are kept"
        )
    return f"cannot write the run folder {out} ({exc.strerror or exc}): choose a folder you can write to (--out DIR)"
