"""Atomic file writes: at every instant `path` is either the old complete file or the new one.

Write a temporary file beside the target, fsync it, rename it over the target, fsync the folder
so the rename itself survives a power cut. A crash, a kill -9 or Ctrl-C at any point leaves no
half-written file and no temporary one behind (except after a kill -9, whose `*.tmp` is harmless).
Sessions, recipes and the compact model file all save this way.

This module is also the one output-path guard. Every file the project writes goes through
`atomic_path` (whole files) or `open_append` (logs), and both refuse to write through a symbolic
link: a `recipe.toml` or `run.log` linked to another file is refused, never followed. A path made
from a name or an id (`guarded_path(folder, name)`) refuses `..`, absolute parts and linked
folders, so it stays inside `folder`. The refusals are `UnsafeOutputPath` (an OSError, so every
caller that reports a write problem in one line reports this one too).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UnsafeOutputPath(OSError):
    """A write the guard refuses (a symbolic link, `..`, a path outside its folder); the message
    says which path and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror


def refuse_link(path: str | Path) -> Path:
    """`path`, unless it is a symbolic link (dangling or not): writing would change its target."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafeOutputPath(
            f"refusing to write {path}: it is a symbolic link (to {os.readlink(path)}); "
            "remove the link or choose another folder"
        )
    return path


def guarded_path(folder: str | Path, *parts: str) -> Path:
    """`folder`/`parts`, refused when a part is absolute or holds `..`, when a part that exists is a
    symbolic link, or when the result would not be inside `folder`. Names and ids become paths here."""
    folder = Path(folder)
    path = folder
    for part in parts:
        rel = Path(part)
        if rel.is_absolute() or ".." in rel.parts or not str(part).strip():
            raise UnsafeOutputPath(
                f"refusing to write {part!r} under {folder}: a name must not hold '..' or start with '/'"
            )
        for piece in rel.parts:
            path = path / piece
            refuse_link(path)
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        raise UnsafeOutputPath(f"refusing to write {path}: it is not inside {folder}") from None
    return path


def open_append(path: str | Path, encoding: str = "utf-8"):
    """`path` opened for appending text (created if missing), never through a symbolic link."""
    path = refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if path.is_symlink():  # made a link between the check and the open
            refuse_link(path)
        raise exc
    return os.fdopen(fd, "a", encoding=encoding)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on a clean exit it replaces `path`, durably.

    For writers that want a file name rather than bytes (safetensors' `save_file`). On an
    exception the temporary file is removed and `path` is left as it was. A `path` that is a
    symbolic link is refused (`UnsafeOutputPath`).
    """
    path = refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); not possible on every platform, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
