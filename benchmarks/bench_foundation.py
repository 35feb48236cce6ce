"""Foundation benchmark (prints figures; never asserted): bundled model on this machine.

Each step runs in its own process so its peak RSS is its own:
  convert  GGUF -> HF folder conversion into a fresh cache (plus one reload of the cached folder)
  load     loading the cached HF folder
  wanda    WANDA 2:4 on all decoder projections, calibration 32 x 128 C4 tokens included (default:
           true-sequential statistics, one pass per layer)
  wanda-reference  the same with sequential = "layer" (the WANDA reference code, two passes per layer)
  rank     depth importance by perplexity (each unprotected layer removed alone), 8 x 128 tokens
Usage: python -m benchmarks.bench_foundation [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import peak_rss_gib

ROOT = Path(__file__).resolve().parent.parent


def step(name: str, data_dir: str | None) -> dict:
    import torch

    from frankenlab.pipeline.calibration import CalibrationConfig
    from frankenlab.pipeline.context import StageContext
    from frankenlab.pipeline.loading import load_model

    out: dict = {"step": name, "threads": torch.get_num_threads()}
    if name == "convert":
        with tempfile.TemporaryDirectory() as cache:
            os.environ["FRANKENLAB_CACHE"] = cache
            t0 = time.perf_counter()
            load_model()
            out["seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            load_model()
            out["reload_seconds"] = time.perf_counter() - t0
    elif name == "load":
        t0 = time.perf_counter()
        load_model()
        out["seconds"] = time.perf_counter() - t0
    else:
        lm = load_model()
        if name.startswith("wanda"):
            from frankenlab.pipeline.stages import width

            ctx = StageContext(lm.tokenizer, lm.device, CalibrationConfig(samples=32, seq_len=128), data_dir)
            t0 = time.perf_counter()
            sequential = "layer" if name == "wanda-reference" else "projection"
            r = width.run(lm.model, ctx, width.Config(pattern="2:4", sequential=sequential))
            out["seconds"] = time.perf_counter() - t0
            out["density"] = r.report["targeted_density"]
        elif name == "rank":
            from frankenlab.pipeline.stages import depth

            ctx = StageContext(lm.tokenizer, lm.device, CalibrationConfig(samples=32, seq_len=128), data_dir)
            ctx.calibration_ids()  # tokenizing calibration text is not part of the ranking
            t0 = time.perf_counter()
            scores = depth.importance(lm.model, ctx, depth.Config(k=2, samples=8))
            out["seconds"] = time.perf_counter() - t0
            out["least_important"] = sorted(scores, key=scores.get)[:4]
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=os.environ.get("FRANKENLAB_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--step", default=None)
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.data_dir)))
        return
    rows = []
    for name in ("convert", "load", "wanda", "wanda-reference", "rank"):
        p = subprocess.run(
            [sys.executable, __file__, "--step", name, "--data-dir", args.data_dir],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if p.returncode:
            print(f"{name}: failed\n{p.stderr[-2000:]}")
            continue
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"{'step':16} {'seconds':>8} {'peak RSS GiB':>13}  notes")
    for r in rows:
        notes = {k: v for k, v in r.items() if k not in ("step", "seconds", "peak_rss_gib")}
        print(f"{r['step']:16} {r['seconds']:8.2f} {r['peak_rss_gib']:13.2f}  {notes}")


if __name__ == "__main__":
    main()
