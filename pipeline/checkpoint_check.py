"""The strict check a plain model folder passes before any of its weights load.

Split out of `pipeline.loading` because it is a job of its own: it reads only config.json and the
safetensors headers (no tensor data) and decides whether the checkpoint is a LLaMA-architecture causal
LM whose tensors are exactly the ones its config describes, so that transformers never fills a missing
weight with random numbers. `pipeline.loading.load_model` calls `check_model_folder` first and
`loading_info_problem` on transformers' own report afterwards.
"""

from __future__ import annotations

from pathlib import Path

import torch

from frankenlab.evals.errors import ModelLoadError

# -- strict loading ----------------------------------------------------------------------------------
# transformers fills a weight the checkpoint lacks with random numbers and ignores one it does not
# expect (its "newly initialized" warning is routed away with the other library noise), so a model
# with two layers missing would be evaluated with two random layers. Every folder is checked first:
# its config must build a LLaMA-architecture causal LM, and the checkpoint's tensor names and shapes
# (read from the safetensors headers, no data) must be exactly the ones that model holds.

REFUSED_HINT = "the folder's weights do not belong to its config.json: download or export the model again"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PROJECTIONS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SAFETENSORS_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def read_config(folder: str | Path) -> dict:
    """config.json of a model folder as a dict; ModelLoadError (one line) when it cannot be read."""
    import json

    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} holds no config.json: not a Hugging Face model folder") from None
    except OSError as exc:
        raise ModelLoadError(unreadable(path, exc)) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}): download or export the model again") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object: download or export the model again")
    return data


def unreadable(path: str | Path, exc: OSError) -> str:
    """One line for a file or folder that exists but cannot be read."""
    where = exc.filename or path
    return f"cannot read {where} ({exc.strerror or exc}): check its permissions (chmod, or run as its owner)"


def safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a .safetensors file, from its header alone (no tensor data is read).

    ModelLoadError when the file is not safetensors or its data does not cover what the header
    describes (a truncated download)."""
    import json

    bad = f"{path} is not a complete safetensors file"
    fix = "the download or copy was cut short or the file is corrupt; download or export the model again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > SAFETENSORS_MAX_HEADER or n > size - 8:
                raise ModelLoadError(f"{bad} (its {size:,} bytes hold no valid header): {fix}")
            raw = f.read(n)
    except OSError as exc:
        raise ModelLoadError(unreadable(path, exc)) from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
        shapes, end = {}, 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shapes[name] = tuple(int(d) for d in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
    except (ValueError, TypeError, KeyError, IndexError):
        raise ModelLoadError(f"{bad} (its header is not readable): {fix}") from None
    if end != size - 8 - n:
        raise ModelLoadError(
            f"{bad} (its header describes {end:,} bytes of data, the file holds {size - 8 - n:,}): {fix}"
        )
    return shapes


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Every tensor name and shape of a folder's safetensors checkpoint (single file or sharded);
    None when the folder holds no safetensors (a pytorch_model.bin: checked after loading)."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except OSError as exc:
            raise ModelLoadError(unreadable(index, exc)) from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{index} is not a valid safetensors index: download the model again") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        shard = folder / name
        if not shard.is_file():
            raise ModelLoadError(f"{shard} is missing (the index names it): download the model again")
        shapes.update(safetensors_header(shard))
    return shapes


def _expected_model(folder: Path, config: dict, trust_remote_code: bool):
    """The model config.json describes, built on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = config.get("model_type") or "?"
    try:
        cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelLoadError(
            f"{folder}: config.json (model_type {kind!r}) does not describe a causal LM transformers can build "
            f"({why}); frankenlab works on LLaMA-architecture models: pass one with --model"
        ) from None
    return model


def llama_problem(model: torch.nn.Module) -> str | None:
    """Why `model` is not a LLaMA-architecture causal LM (model.layers of decoder layers, each with the
    q/k/v/o attention and gate/up/down MLP projections the stages edit), or None."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return "it has no model.layers list of decoder layers"
    names = {n for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [p for p in PROJECTIONS if p not in names]
    return f"its decoder layers have no {', '.join(missing)}" if missing else None


# What transformers itself skips: buffers older checkpoints saved (recomputed, not weights).
IGNORED_UNEXPECTED = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")


def weights_problem(
    expected: dict[str, tuple],
    tied: list[set[str]],
    found: dict[str, tuple],
    *,
    ignore_missing: tuple[str, ...] = (),
    ignore_unexpected: tuple[str, ...] = IGNORED_UNEXPECTED,
) -> str | None:
    """What differs between the tensors a model holds (`expected`: name -> shape, `tied`: groups of
    names that share one tensor, any one of which may stand for all) and a checkpoint's (`found`);
    names matching an `ignore_*` pattern (the model class's own `_keys_to_ignore_on_load_*`) are
    no problem, as transformers does not report them either."""
    import re

    prefixes = ("model.",)
    if found and not any(k.startswith(prefixes) for k in found):  # saved from the base model: no "model." prefix
        found = {(k if k.startswith("lm_head.") else "model." + k): v for k, v in found.items()}
    stands_in = {name: group for group in tied for name in group}
    missing = [k for k in expected if k not in found and not (stands_in.get(k, set()) & found.keys())]
    missing = [k for k in missing if not any(re.search(p, k) for p in ignore_missing)]
    unexpected = [k for k in found if k not in expected and not any(re.search(p, k) for p in ignore_unexpected)]
    wrong = [
        f"{k} {list(found[k])} (config: {list(expected[k])})"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{len(names)} {label} tensor(s): {', '.join(names[:3])}{more}")
    return "; ".join(parts) or None


def check_model_folder(folder: str | Path, *, trust_remote_code: bool = False) -> None:
    """Refuse (ModelLoadError, one line) a plain model folder that is not a LLaMA-architecture causal
    LM, or whose safetensors checkpoint is truncated or holds missing, unexpected or mis-shaped
    tensors against what its config.json describes. Reads config.json and the headers only."""
    folder = Path(folder)
    config = read_config(folder)
    model = _expected_model(folder, config, trust_remote_code)
    problem = llama_problem(model)
    if problem:
        raise ModelLoadError(
            f"{folder} holds a {config.get('model_type') or type(model).__name__!r} model "
            f"({type(model).__name__}): {problem}. frankenlab works on LLaMA-architecture causal LMs "
            "(LLaMA, SmolLM, ...): pass one with --model"
        )
    found = checkpoint_shapes(folder)
    if found is None:
        return
    expected, by_tensor = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        expected[name] = tuple(tensor.shape)
        by_tensor.setdefault(id(tensor), set()).add(name)
    tied = [names for names in by_tensor.values() if len(names) > 1]
    problem = weights_problem(
        expected,
        tied,
        found,
        ignore_missing=tuple(getattr(model, "_keys_to_ignore_on_load_missing", None) or ()),
        ignore_unexpected=IGNORED_UNEXPECTED + tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
    )
    if problem:
        raise ModelLoadError(f"{folder}: {problem}; {REFUSED_HINT}")


def loading_info_problem(info: dict | None) -> str | None:
    """The same verdict from transformers' own loading report (missing, unexpected, mismatched keys)."""
    if not info:
        return None
    parts = []
    for key, label in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "mis-shaped"),
    ):
        names = [k if isinstance(k, str) else str(k[0]) for k in (info.get(key) or [])]
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{len(names)} {label} tensor(s): {', '.join(sorted(names)[:3])}{more}")
    return "; ".join(parts) or None
