"""A content hash of a model's weights, so a replay can tell whether it ran on the same model.

sha256 over the weight files (name and digest of each, in name order). A 1B model is 2.5 GB, so
each file's digest is cached by (real path, size, mtime) in the frankenlab cache folder and
computed once. Files inside a Hugging Face cache snapshot are links to blobs already named by
their sha256; those names are used directly. Sessions record it (`sessions/recorder.py`), the
distillation teacher's cache is keyed by it (`pipeline/distill.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _cache_file() -> Path:
    env = os.environ.get("FRANKENLAB_CACHE")
    base = (
        Path(env).expanduser()
        if env
        else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "frankenlab"
    )
    return base / "weight-hashes.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_sha256(path: Path, cache: dict | None = None) -> str:
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):  # HF cache: the blob name is its hash
        return real.name
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    if cache is not None and key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    if cache is not None:
        cache[key] = digest
    return digest


def weight_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    files = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    # a folder with safetensors also may hold a stale pytorch_model.bin; the safetensors are what loads
    if any(f.suffix == ".safetensors" for f in files):
        files = [f for f in files if f.suffix == ".safetensors"]
    return files


def weights_digest(path: str | Path | None) -> dict | None:
    """{"algorithm": "sha256", "digest", "files", "bytes"} for the weights at `path`, or None if none found."""
    if not path:
        return None
    files = weight_files(path)
    if not files:
        return None
    cache_path = _cache_file()
    cache = _load_cache(cache_path)
    before = len(cache)
    total = hashlib.sha256()
    size = 0
    for f in files:
        total.update(f.name.encode() + b"\0" + file_sha256(f, cache).encode() + b"\n")
        size += f.stat().st_size
    if len(cache) != before:
        if len(cache) > 500:  # forget files that no longer exist
            cache = {k: v for k, v in cache.items() if Path(k.split("|")[0]).exists()}
        try:
            from frankenlab.pipeline.atomic import atomic_write_text

            atomic_write_text(cache_path, json.dumps(cache, indent=0))
        except OSError:
            pass  # a read-only cache only costs time
    return {"algorithm": "sha256", "digest": total.hexdigest(), "files": [f.name for f in files], "bytes": size}
