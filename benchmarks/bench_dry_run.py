"""`frankenlab sweep --dry-run` on a 100,000-configuration grid (prints figures; never asserted).

The grid is the tiny test model's Width 2:4 > LoRA with five LoRA axes of ten values each. The
command runs in a subprocess (its own peak memory), with --no-estimate (listing and counting only)
and, with --estimate, with the duration estimate from a fresh rate cache (its probes included).
Wall time, CPU seconds of the child and its peak RSS, with the load average beside them.
Usage: python -m benchmarks.bench_dry_run [--estimate] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_average

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimate", action="store_true", help="also time the dry run with the duration estimate")
    ap.add_argument("--data-dir", default=os.environ.get("FRANKENLAB_DATA_DIR"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.test_estimate import HUGE_AXES, grid_text
    from tests.tiny import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_llama(tmp / "tiny")
        spec = tmp / "huge.toml"
        spec.write_text(grid_text(model, HUGE_AXES))
        runs = [("listing only", ["--no-estimate"])] + ([("with the estimate", [])] if args.estimate else [])
        for what, extra in runs:
            env = {**os.environ, "FRANKENLAB_CACHE": str(tmp / f"cache-{len(extra)}"), "FRANKENLAB_ESTIMATE": "1"}
            if args.data_dir:
                env["FRANKENLAB_DATA_DIR"] = args.data_dir
            cmd = [sys.executable, "-m", "frankenlab.tui", "sweep", str(spec), "--out", str(tmp / "o"), "--dry-run"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            done = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            lines = done.stdout.splitlines()
            print(
                f"dry run of 100,000 configurations, {what}: {wall:.1f} s wall, {cpu:.1f} CPU-s, "
                f"peak RSS {after.ru_maxrss / 1024:.0f} MiB, {len(lines)} lines, exit {done.returncode}; "
                f"load {load_average()}"
            )
            print("  " + (lines[0] if lines else done.stderr.strip()[-300:]))


if __name__ == "__main__":
    main()
