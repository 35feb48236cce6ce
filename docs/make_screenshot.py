"""The README's screenshot: the lab on the bundled model, from a real run (headless, no terminal needed).

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python docs/make_screenshot.py [--out docs/img/lab.svg]

Opens the lab with Textual's `App.run_test()` on the bundled SmolLM2-135M-Instruct, waits until the
what-if estimator's baseline pass has finished, runs the importance scan (key i: every cell coloured
by what removing it costs), skips one layer in the grid (as the space key does) and waits for that
plan's exact what-if perplexity, then saves the screen as SVG. `--png` also writes a PNG beside it
with `rsvg-convert` (Debian: librsvg2-bin), to look at the result. Takes two to four minutes on a
2-core CPU. The numbers on it are whatever this machine measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def shoot(app, out: Path, layer: int, size: tuple[int, int], timeout: float, scan: bool) -> str:
    from frankenlab.tui.widgets.whatif import WhatIf

    async with app.run_test(size=size) as pilot:
        deadline = time.monotonic() + timeout
        line = app.query_one("#whatif", WhatIf)
        while line.scheduler is None or not line.scheduler.estimator.ready:  # the baseline pass
            if time.monotonic() > deadline:
                raise SystemExit("make_screenshot: the what-if baseline did not finish in time")
            await pilot.pause(0.2)
        app.query_one("#grid").focus()
        await pilot.pause(0.2)
        if scan:  # the importance scan (key i) colours every cell by what removing it costs
            await pilot.press("i")
            while "importance scan done" not in str(line.render()):
                if "failed" in str(line.render()) or time.monotonic() > deadline:
                    raise SystemExit(f"make_screenshot: the importance scan did not finish ({line.render()})")
                await pilot.pause(0.5)
        for _ in range(layer):
            await pilot.press("right")
        await pilot.press("space")  # skip the layer under the cursor
        while "full slice" not in str(line.render()):  # the exact estimate, not the first answer
            if str(line.render()).startswith("what-if failed") or time.monotonic() > deadline:
                raise SystemExit(f"make_screenshot: no what-if estimate on screen ({line.render()})")
            await pilot.pause(0.2)
        await pilot.pause(0.5)
        out.parent.mkdir(parents=True, exist_ok=True)
        app.save_screenshot(filename=out.name, path=str(out.parent))
        return str(line.render())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "lab.svg"), help="SVG file to write")
    ap.add_argument("--layer", type=int, default=10, help="the decoder layer to skip (default 10)")
    ap.add_argument("--size", default="120x26", help="terminal size, COLSxROWS (default 120x26)")
    ap.add_argument("--png", action="store_true", help="also write a PNG beside the SVG (needs rsvg-convert)")
    ap.add_argument("--no-scan", action="store_true", help="skip the importance scan (cells stay uncoloured)")
    ap.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    args = ap.parse_args(argv)
    try:
        cols, rows = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"make_screenshot: --size {args.size!r} is not COLSxROWS, e.g. 120x26", file=sys.stderr)
        return 2

    from frankenlab.tui.cli.main import _quiet_libraries

    _quiet_libraries()  # before torch and its libraries load: their notices stay off the terminal
    from frankenlab.pipeline.loading import load_model
    from frankenlab.tui.app import create_app

    data_dir = os.environ.get("FRANKENLAB_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    if not Path(data_dir).is_dir():
        print(f"make_screenshot: no data folder at {data_dir}: set FRANKENLAB_DATA_DIR", file=sys.stderr)
        return 2
    app = create_app(loaded=load_model(), data_dir=data_dir, runs_dir=str(ROOT / "runs" / "screenshot"))
    out = Path(args.out).resolve()
    text = asyncio.run(shoot(app, out, args.layer, (cols, rows), args.timeout, not args.no_scan))
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB): {text}")
    if args.png and not shutil.which("rsvg-convert"):
        print("make_screenshot: --png needs rsvg-convert (Debian: apt-get install librsvg2-bin)", file=sys.stderr)
        return 2
    if args.png:
        png = out.with_suffix(".png")
        subprocess.run(["rsvg-convert", "-o", str(png), str(out)], check=True)
        print(f"wrote {png} ({png.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
