"""Third-party progress bars (tqdm: transformers' GGUF conversion, loading and writing weights,
datasets) go to the command's log file, not the user's terminal, where they would tear the
command's own progress lines. Stages in worker processes (GPTQ, EoRA) print into their own log
already (`pipeline.worker_process`)."""

from __future__ import annotations

import os
from pathlib import Path

_STATE: dict = {}


def bars_to_log(path: str | os.PathLike) -> bool:
    """From now on, a tqdm bar that names no file of its own writes to `path` (appended, at most one
    update every 10 s, no cursor tricks); False when the file cannot be opened (bars then stay off)."""
    try:
        import tqdm.std
    except ImportError:
        return False
    from frankenlab.pipeline.atomic import open_append

    try:
        stream = open_append(Path(path))
    except OSError:
        stream = open(os.devnull, "w")  # noqa: SIM115 - kept open for the process's bars
    old = _STATE.get("stream")
    _STATE["stream"] = stream
    if old is not None:
        old.close()
        return True
    original = tqdm.std.tqdm.__init__

    def __init__(self, *args, **kwargs):
        if kwargs.get("file") is None and len(args) < 4:  # file is tqdm's fourth positional parameter
            kwargs.update(file=_STATE["stream"], mininterval=max(10.0, kwargs.get("mininterval") or 0), ascii=True)
            kwargs["dynamic_ncols"] = False
            kwargs.setdefault("ncols", 100)
        original(self, *args, **kwargs)

    _STATE["original"] = original
    tqdm.std.tqdm.__init__ = __init__
    return True


def bars_off_log() -> None:
    """Undo `bars_to_log`: bars draw where they did before (tests; a lab that ran a command)."""
    import tqdm.std

    if "original" in _STATE:
        tqdm.std.tqdm.__init__ = _STATE.pop("original")
    stream = _STATE.pop("stream", None)
    if stream is not None:
        stream.close()
