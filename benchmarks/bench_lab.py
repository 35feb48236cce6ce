"""What a user waits for in the lab: toggle a layer, see its what-if perplexity (printed, never asserted).

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/bench_lab.py [--layers 0,10,20]

Drives the real Textual app headless (Pilot) on the bundled model, exactly as keys would: for each
layer, move the grid cursor, press space (skip it), wait until the what-if line shows that plan's
first answer (from part of the slice, "≈") and then its exact estimate (on the full slice), press space again (back to the unmodified model, answered without an estimate). The time
from the key press to the text on screen includes the thread worker, the estimate and the redraw.
An event-loop probe (a 50 ms timer) runs throughout: its extra delays say whether the screen stayed
responsive while torch computed. The lab runs the baseline pass by itself at start; the benchmark
waits for it (as a user reading the screen would) and reports the first toggle apart anyway.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def drive(app, layers: list[int], timeout: float) -> tuple[list[tuple[int, float, str, float]], list[float]]:
    from tui.widgets.whatif import WhatIf

    gaps: list[float] = []
    rows: list[tuple[int, float, str, float]] = []  # layer, seconds to the first answer, its text, to the exact one
    async with app.run_test(size=(160, 48)) as pilot:
        t_mount = time.perf_counter()
        while app.query_one("#whatif", WhatIf).scheduler is None:  # the model is handed over at mount
            await pilot.pause(0.1)
        estimator = app.query_one("#whatif", WhatIf).scheduler.estimator
        while not estimator.ready:  # the lab warms the baseline pass up by itself
            await pilot.pause(0.1)
        print(f"  baseline warm-up done {time.perf_counter() - t_mount:.2f} s after the lab started", flush=True)
        last = [time.perf_counter()]

        def tick() -> None:
            now = time.perf_counter()
            gaps.append(now - last[0] - 0.05)
            last[0] = now

        app.set_interval(0.05, tick)
        app.query_one("#grid").focus()
        await pilot.pause(0.2)
        line = app.query_one("#whatif", WhatIf)
        cursor = 0
        for i in layers:
            for _ in range(i - cursor):
                await pilot.press("right")
            for _ in range(cursor - i):
                await pilot.press("left")
            cursor = i
            before = str(line.render())
            t0 = time.perf_counter()
            await pilot.press("space")
            first = None
            while True:
                text = str(line.render())
                if first is None and text.startswith("what-if ppl") and text != before:
                    first = (time.perf_counter() - t0, text)
                if first is not None and "full slice" in text:
                    break
                if text.startswith("what-if failed") or time.perf_counter() - t0 > timeout:
                    raise SystemExit(f"layer {i}: no estimate on screen ({text!r})")
                await asyncio.sleep(0.01)
            rows.append((i, first[0], first[1], time.perf_counter() - t0))
            print(f"  skip {i:2d}: {first[0]:5.2f} s to the first answer | {first[1]}", flush=True)
            print(f"           {rows[-1][3]:5.2f} s to the exact one    | {text}", flush=True)
            await pilot.press("space")  # back to the unmodified model
            await pilot.pause(0.05)
    return rows, gaps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=None, help="layers to toggle, e.g. 0,10,20 (default: all)")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)

    from benchmarks.common import load_average, machine_line
    from pipeline.models import decoder_layers, load_model
    from tui.app import create_app
    from tui.cli import _quiet_libraries

    _quiet_libraries()
    lm = load_model()
    n = len(decoder_layers(lm.model))
    layers = list(range(n)) if not args.layers else [int(x) for x in args.layers.split(",")]
    data_dir = os.environ.get("FRANKENLAB_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    print(f"lab: {machine_line(lm)}; load average {load_average()}")
    app = create_app(loaded=lm, data_dir=data_dir, runs_dir=str(ROOT / "runs" / "bench-lab"))
    rows, gaps = asyncio.run(drive(app, layers, args.timeout))
    first, rest = rows[0], [r[1] for r in rows[1:]]
    exact = [r[3] for r in rows[1:]]
    gaps.sort()
    figures = {
        "first_toggle_s": first[1],
        "median_exact_s": statistics.median(exact) if exact else None,
        "median_toggle_s": statistics.median(rest) if rest else None,
        "max_toggle_s": max(rest) if rest else None,
        "event_loop_max_extra_ms": gaps[-1] * 1000 if gaps else None,
        "event_loop_p99_extra_ms": gaps[int(len(gaps) * 0.99)] * 1000 if gaps else None,
    }
    if rest:
        print(f"key press -> first answer on screen: first toggle {first[1]:.2f} s, "
              f"then median {figures['median_toggle_s']:.2f} s, max {figures['max_toggle_s']:.2f} s "
              f"over {len(rest)} toggles; exact estimate on screen: median {figures['median_exact_s']:.2f} s; "
              f"load average {load_average()}")
    if gaps:
        print(f"event loop: {len(gaps)} ticks of 50 ms, largest extra delay {figures['event_loop_max_extra_ms']:.0f} ms, "
              f"p99 {figures['event_loop_p99_extra_ms']:.0f} ms")
    return figures


if __name__ == "__main__":
    main()
