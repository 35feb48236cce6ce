"""Folders that hold quantized models: the manifest a stage writes and what a folder turns out to be.

Split out of `pipeline.quant` because it never touches gptqmodel: reading and writing
`frankenlab-quant.json`, telling whether a folder (a gptqmodel folder, a gptq stage folder, an eora
stage folder) opens as a quantized model, and the disk size of such a folder are plain file work that
`pipeline.loading`, `pipeline.child_stage`, `sessions.replay` and the gptq/eora stages use without
loading the quantization library.
"""

from __future__ import annotations

from pathlib import Path

from frankenlab.pipeline.atomic import atomic_write_text


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
        qcfg = json.loads((path / "quantize_config.json").read_text())
        groups = {int(qcfg.get("group_size", 128))}
        for key, over in (qcfg.get("dynamic") or {}).items():  # per-layer group sizes (the gptq stage's maps)
            if not str(key).startswith("-:") and isinstance(over, dict) and "group_size" in over:
                groups.add(int(over["group_size"]))
    except (OSError, ValueError, TypeError, AttributeError):
        return False
    dims = [cfg.get("hidden_size", 0), cfg.get("intermediate_size", 0)]
    return all(group <= 0 or d % group == 0 for group in groups for d in dims)


# -- folders that hold quantized models ------------------------------------------------------------
MANIFEST = "frankenlab-quant.json"


def write_manifest(
    folder: Path, quantized: Path, *, adapter: Path | None = None, rank: int | None = None, prequant: Path | None = None
) -> Path:
    """`folder/frankenlab-quant.json`: which quantized folder (and adapter) this folder stands for.

    Paths are stored relative to `folder` so a run folder can be moved or copied as a whole.
    """
    import json
    import os

    folder = Path(folder)

    def rel(p: Path | None) -> str | None:
        return None if p is None else os.path.relpath(Path(p).resolve(), folder.resolve())

    data = {
        "format": "gptqmodel",
        "quantized": rel(quantized),
        "adapter": rel(adapter),
        "adapter_type": "eora" if adapter is not None else None,
        "rank": rank,
        "prequant": rel(prequant),
    }
    path = folder / MANIFEST
    atomic_write_text(path, json.dumps({k: v for k, v in data.items() if v is not None}, indent=2))
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
            raise ValueError(
                f"{manifest} names the quantized folder {qdir}, which holds no quantize_config.json "
                "(was the gptq stage's folder moved or deleted?)"
            )
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise ValueError(f"{manifest} names the adapter folder {adapter}, which holds no adapter_config.json")
        prequant = resolve("prequant") or _sibling_prequant(qdir)
        return {
            "kind": "gptq+eora" if adapter is not None else "gptq",
            "quantized": qdir,
            "adapter": adapter,
            "rank": data.get("rank"),
            "prequant": prequant,
        }
    for qdir in (path, path / "quantized"):  # a gptqmodel folder, or a gptq stage folder holding one
        if (qdir / "quantize_config.json").is_file() and (qdir / "config.json").is_file():
            return {
                "kind": "gptq",
                "quantized": qdir.resolve(),
                "adapter": None,
                "rank": None,
                "prequant": _sibling_prequant(qdir),
            }
    return None


def _sibling_prequant(qdir: Path) -> Path | None:
    pre = Path(qdir).resolve().parent / "prequant"
    return pre if (pre / "config.json").is_file() else None


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def saved_folder_problem(artifact: str | None, label: str) -> str | None:
    """Why a later stage cannot resume from a quantization stage's saved folder (None: it can).
    `label` starts the message for a missing folder ("its saved model folder")."""
    try:
        found = describe_folder(artifact) if artifact else None
    except ValueError as exc:
        return str(exc)
    return None if found else f"{label} {artifact} is missing"
