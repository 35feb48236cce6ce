"""The cost of running the gptq stage in a worker process (pipeline.child_stage) instead of in-process.

    FRANKENLAB_DATA_DIR=/work/shared/data python -m benchmarks.bench_child_stage [--layers K] [--reps 2]
        [--samples 8] [--seq-len 64]

The bundled SmolLM2-135M-Instruct (its first `--layers` decoder layers, saved once to a scratch
folder: the "previous stage's saved folder") is quantized by the gptq stage with the same settings
and calibration windows, alternately in this process and in a worker process, `--reps` times each,
interleaved so machine load hits both alike. gptqmodel is imported here before the first timing, so
the in-process figure holds no import; the worker pays its imports every time, as it does in a run.
Wall seconds and CPU seconds (this process plus its finished child processes) are printed per run,
and the median difference: what a run pays for the worker (its imports, one model load in the worker,
one in this process), then those three parts timed alone.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_average, machine_line


def cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=None, help="keep only the first K decoder layers")
    p.add_argument("--reps", type=int, default=2, help="runs of each variant, interleaved")
    p.add_argument("--samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=64, help="calibration window length")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)

    from frankenlab.pipeline import child_stage, quant
    from frankenlab.pipeline.calibration import CalibrationConfig
    from frankenlab.pipeline.context import StageContext
    from frankenlab.pipeline.loading import decoder_layers, load_model
    from frankenlab.pipeline.stages import gptq, stage_kind

    with contextlib.redirect_stdout(sys.stderr):  # its banner
        quant.gptqmodel()  # imported once here: the in-process runs pay no import
    lm = load_model("default", device="cpu", dtype="float32")
    model = lm.model
    if args.layers:
        del decoder_layers(model)[args.layers :]
        model.config.num_hidden_layers = args.layers
    print(machine_line(lm))
    scratch = Path(tempfile.mkdtemp(prefix="bench-child-stage-"))
    source = scratch / "input"
    model.save_pretrained(source)
    lm.tokenizer.save_pretrained(source)
    stage = stage_kind("gptq")
    config = gptq.Config(samples=args.samples, seq_len=args.seq_len)
    cal = CalibrationConfig("c4", samples=args.samples, seq_len=args.seq_len)
    print(
        f"gptq {config.bits}-bit g{config.group_size}, {len(decoder_layers(model))} layers, "
        f"{args.samples} x {args.seq_len} C4 tokens; load {load_average()}"
    )
    times: dict[str, list[tuple[float, float]]] = {"in-process": [], "worker": []}
    for rep in range(args.reps):
        for variant in ("in-process", "worker"):
            ctx = StageContext(
                lm.tokenizer,
                lm.device,
                cal,
                Path(args.data_dir) if args.data_dir else None,
                scratch / f"{rep}-{variant}" / "stages" / "01-gptq",
                index=1,
                input_artifact=source,
            )
            wall, cpu = time.perf_counter(), cpu_seconds()
            if variant == "in-process":
                with contextlib.redirect_stdout(sys.stderr):  # gptqmodel prints its banner and configs
                    result = stage.run(model, ctx, config)
            else:
                result = child_stage.run_in_child(stage, model, ctx, config)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            assert result.report["quantized_linears"] == 7 * len(decoder_layers(model))
            times[variant].append((wall, cpu))
            print(f"  {rep + 1}. {variant:<10} {wall:7.1f} s wall, {cpu:7.1f} s CPU (load {load_average()})")
            del result
    med = {v: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for v, t in times.items()}
    for v, (w, c) in med.items():
        print(f"median {v:<10} {w:7.1f} s wall, {c:7.1f} s CPU")
    dw, dc = med["worker"][0] - med["in-process"][0], med["worker"][1] - med["in-process"][1]
    print(f"worker overhead: {dw:+.1f} s wall ({med['worker'][0] / med['in-process'][0]:.2f}x), {dc:+.1f} s CPU")
    # where the difference goes: the worker's imports, its load of the input, this process's load of the result
    t = time.perf_counter()
    imports = "import torch, transformers; from frankenlab.pipeline import child_stage, quant; quant.gptqmodel()"
    subprocess.run([sys.executable, "-c", imports], check=True, capture_output=True)
    parts = {"worker's imports (a fresh python)": time.perf_counter() - t}
    t = time.perf_counter()
    load_model(str(source), device="cpu", dtype="float32")
    parts["load of the input folder"] = time.perf_counter() - t
    t = time.perf_counter()
    load_model(str(scratch / f"{args.reps - 1}-worker" / "stages" / "01-gptq" / "quantized"), device="cpu")
    parts["load of the quantized folder"] = time.perf_counter() - t
    for name, seconds in parts.items():
        print(f"  {name:<36} {seconds:5.1f} s wall")
    print(f"load average at the end: {load_average()}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
