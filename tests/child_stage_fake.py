"""A stage that runs in a worker process (RUNS_IN_CHILD) and misbehaves on request: tests/test_child_stage.py.

`behaviour`: "ok" (talks, scales the embeddings by 2, returns), "exit" (os._exit(1) from a thread
after printing a traceback, as gptqmodel's workers do), "abort" (SIGABRT), "raise" (a RuntimeError),
"oom" (torch.OutOfMemoryError), "refuse" (a RecipeError),
"wait" (checks the cancel flag until it is set), "deaf" (ignores a cancel), "noisy" (prints to stdout and
stderr, from Python and from C, draws a tqdm bar and logs a warning, as gptqmodel does per layer, then returns).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from frankenlab.evals.config import option
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.context import StageContext, StageResult

RUNS_IN_CHILD = True


@dataclass(frozen=True)
class Config:
    behaviour: str = option("ok", help="what the stage does (see the module docstring)")


def run(model, ctx: StageContext, config: Config) -> StageResult:
    ctx.progress(0.5, f"pid {os.getpid()}")
    ctx.log(f"child stage {config.behaviour} in pid {os.getpid()}")
    ctx.metric("fake_metric", 1.5, "fake-protocol")
    b = config.behaviour
    if b == "exit":

        def worker():
            try:
                raise ValueError("boom inside a worker thread")
            except ValueError:
                sys.stderr.write("Quantizing [#####     ] 50%\r")  # a progress bar before it, as gptqmodel's
                traceback.print_exc()
                os._exit(1)

        threading.Thread(target=worker).start()
        time.sleep(60)
    elif b == "noisy":
        import logging

        from tqdm import tqdm

        print("NOISY-STDOUT quantizing layer 3/30")
        print("NOISY-STDERR a library's warning", file=sys.stderr)
        os.write(1, b"NOISY-FD1 written below Python\n")
        for _ in tqdm(range(3), desc="NOISY-TQDM"):
            pass
        logging.getLogger("gptqmodel").warning("NOISY-LOGGING per-layer line")
    elif b == "abort":
        os.abort()
    elif b == "raise":
        raise RuntimeError("the fake stage broke")
    elif b == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    elif b == "refuse":
        raise RecipeError("the fake stage refuses this model: choose another")
    elif b in ("wait", "deaf"):
        (ctx.work_dir / "partial").mkdir(parents=True, exist_ok=True)  # a half-written stage folder
        for _ in range(1200):
            if b == "wait":
                ctx.check_cancel()
            time.sleep(0.05)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(2)
    return StageResult(model, {"pid": os.getpid(), "input": str(ctx.input_artifact)})
