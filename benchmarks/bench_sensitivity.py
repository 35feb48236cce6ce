"""Sensitivity pass benchmark: CPU and wall time of the default pass, entries/s, cancel latency.

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python -m benchmarks.bench_sensitivity [--layers 0,10,20,29]

The pass runs on the bundled model with the default choice set (skip + none x 16/8/4/3 +
1:8/1:4/2:4/8:16 x 16/8/4: N:M at 3 bits is stored dense and never offered), the default scoring windows
(WikiText-2 train 8 x 128) and calibration windows (C4 32 x 128, the stages'), into a fresh temporary
cache; `--around 8:16/4` times a pass around that reference (its build included), as `frankenlab plan
--around auto` runs. With `--layers` only those layers are measured and the full pass is extrapolated:
an entry of layer l costs a constant (the edit, the head) plus the layers after l, so per-layer seconds
are fitted as a + b * (layers after l) and summed over all layers. Cancel latency: the pass is started
again on a fresh cache and cancelled at a random moment; the time from the moment the cancel is asked
for to `Cancelled` reaching the caller is printed.
`--compare` measures "none/4" and "none/3" at a few layers with RTN, with this module's GPTQ and with
gptqmodel's own GPTQ task on each projection (the GPTQ stage's quantizer) as the reference.
Printed, not asserted; process CPU seconds (all threads) beside wall seconds, and the load.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import time

import torch

from benchmarks.common import load_average, machine_line
from frankenlab.evals.cancel import Cancelled
from frankenlab.pipeline.loading import decoder_layers, load_model
from frankenlab.pipeline.planner import layer_edit
from frankenlab.pipeline.planner.options import parse_option
from frankenlab.pipeline.planner.sensitivity import (
    DEFAULT_CALIBRATION,
    DEFAULT_WINDOWS,
    _Pass,
    measure_sensitivities,
    windows_description,
)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_pass(lm, layers, data_dir, method, around=None):
    with tempfile.TemporaryDirectory() as cache:
        t0, c0 = time.perf_counter(), cpu_seconds()
        table = measure_sensitivities(
            lm.model, lm.tokenizer, method=method, cache_dir=cache, data_dir=data_dir, layers=layers, around=around
        )
        return table, time.perf_counter() - t0, cpu_seconds() - c0


def extrapolate(table, measured: list[int]) -> float:
    """Seconds of the full pass from the measured layers' per-layer seconds (least squares in layers after l)."""
    n = table.layers
    xs = [n - 1 - li for li in measured]
    ys = [sum(table.seconds[li].values()) for li in measured]
    if len(measured) < 2:
        return table.baseline_seconds + ys[0] * n
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return table.baseline_seconds + sum(a + b * (n - 1 - li) for li in range(n))


def cancel_latency(lm, data_dir, method, after: float, around=None) -> tuple[float, int]:
    """Seconds from the moment a cancel is asked for (`after` s into the pass, as a user's key press
    sets a flag) to `Cancelled` reaching the caller: the wait for the next check plus the unwinding."""
    asked = time.perf_counter() + after

    def cancel() -> bool:
        return time.perf_counter() >= asked

    with tempfile.TemporaryDirectory() as cache:
        try:
            measure_sensitivities(
                lm.model, lm.tokenizer, method=method, cache_dir=cache, data_dir=data_dir, cancel=cancel, around=around
            )
        except Cancelled:
            return time.perf_counter() - asked, 0
    return float("nan"), 1


def gptqmodel_weights(layer, stats, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Each projection quantized by gptqmodel's GPTQ task (the stage's quantizer) on the same X^T X."""
    from frankenlab.pipeline.layerwise import linear_modules
    from frankenlab.pipeline.quant import gptqmodel
    from frankenlab.pipeline.stages.width import ALL_PROJECTIONS

    gm = gptqmodel()
    from gptqmodel.quantization.gptq import GPTQ

    out = {}
    for name, lin in linear_modules(layer, ALL_PROJECTIONS).items():
        qc = gm.QuantizeConfig(bits=bits, group_size=group_size, sym=True, damp_percent=0.05)
        task = GPTQ(lin, qc)
        task.quantizer.configure(perchannel=True)  # as gptqmodel's GPTQ processor sets it up
        task.fallback, task.expected_nsamples = qc.fallback, None
        task.H = stats[name][1].clone()  # X^T X; its scale does not matter (the dampening is relative)
        task.nsamples = 4096  # enough that gptqmodel does not fall back to rounding
        out[name] = task.quantize()[0].to(lin.weight.dtype).reshape(lin.weight.shape)
    return out


def compare_methods(lm, data_dir, layers: list[int]) -> None:
    from frankenlab.pipeline.calibration import calibration_ids
    from frankenlab.pipeline.planner.sensitivity_table import SensitivityTable

    ids = calibration_ids(lm.tokenizer, DEFAULT_WINDOWS, data_dir=data_dir)
    calib = calibration_ids(lm.tokenizer, DEFAULT_CALIBRATION, data_dir=data_dir)
    table = SensitivityTable("x", len(decoder_layers(lm.model)), ("none",), (4, 3), 128, "gptq", True, "", 1)
    with torch.inference_mode():
        work = _Pass(lm.model, ids, calib, table, cancel=None, damp_percent=0.05)
        table.baseline_nll = work.baseline()
        work.build(None, 128, None)  # every layer's calibration input
        print(f"{'layer':>5} {'option':>7} {'rtn':>9} {'gptq':>9} {'gptqmodel':>10}")
        errs = {"rtn": [], "gptq": []}
        for li in layers:
            layer = work.layers[li]
            stats = layer_edit.layer_stats(layer, work.calib_inputs[li], work.calib_kwargs, need_h=True)
            for bits in (4, 3):
                opt = parse_option(f"none/{bits}")
                row = {}
                for method in ("rtn", "gptq"):
                    w = layer_edit.option_weights(layer, stats, [opt], group_size=128, sym=True, method=method)
                    row[method] = work.entry(li, opt, w[opt.name])
                try:
                    row["ref"] = work.entry(li, opt, gptqmodel_weights(layer, stats, bits, 128))
                except Exception as exc:  # noqa: BLE001 - the reference is optional
                    print(f"gptqmodel reference unavailable: {type(exc).__name__}: {exc}")
                    return
                for method in ("rtn", "gptq"):
                    errs[method].append(abs(row[method] - row["ref"]))
                print(f"{li:>5} {opt.name:>7} {row['rtn']:>+9.5f} {row['gptq']:>+9.5f} {row['ref']:>+10.5f}")
        for method, e in errs.items():
            print(f"{method}: mean |delta - gptqmodel delta| = {statistics.fmean(e):.5f} nats/token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", default="all", help="layers to measure (comma list) or 'all'")
    ap.add_argument("--method", default="gptq", choices=layer_edit.METHODS)
    ap.add_argument("--cancels", type=int, default=3, help="cancel-latency trials")
    ap.add_argument("--compare", default="", help="layers for the RTN / GPTQ / gptqmodel comparison (comma list)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--around", default=None, help="measure around every layer at this option (e.g. 8:16/4)")
    args = ap.parse_args()
    lm = load_model(args.model)
    n = len(decoder_layers(lm.model))
    print(machine_line(lm))
    print(
        f"load average before: {load_average()}; windows {windows_description(None)}; calibration "
        f"{windows_description(None, DEFAULT_CALIBRATION)}; method {args.method}; around {args.around or 'the unmodified model'}"
    )
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    table, wall, cpu = timed_pass(lm, layers, args.data_dir, args.method, args.around)
    entries = sum(map(len, table.deltas.values()))
    print(
        f"pass ({'all' if layers is None else len(layers)}/{n} layers, {entries} entries): wall {wall:.1f} s, "
        f"CPU {cpu:.1f} s, {entries / wall:.3f} entries/s wall, {entries / cpu:.3f} entries/CPU-s; "
        f"baseline{' and reference build' if args.around else ''} {table.baseline_seconds:.1f} s; load {load_average()}"
    )
    if layers is not None:
        full = extrapolate(table, sorted(set(layers)))
        print(
            f"extrapolated full pass ({n} layers x {len(table.measured_options())} entries): wall {full:.0f} s, "
            f"CPU {full * cpu / wall:.0f} s (the measured part's CPU/wall ratio {cpu / wall:.2f})"
        )
    for li in sorted(table.deltas):
        row = table.deltas[li]
        print(f"layer {li:>2}: " + " ".join(f"{o} {row[o]:+.4f}" for o in table.measured_options() if o in row))
    rng = random.Random(0)
    lat = []
    for _ in range(args.cancels):
        after = rng.uniform(2.0, 30.0)
        seconds, finished = cancel_latency(lm, args.data_dir, args.method, after, args.around)
        lat.append(seconds)
        print(
            f"cancel at {after:.1f} s: returned after {seconds * 1000:.0f} ms"
            + (" (finished first)" if finished else "")
        )
    if lat:
        print(f"cancel latency: median {statistics.median(lat) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms")
    if args.compare:
        compare_methods(lm, args.data_dir, [int(x) for x in args.compare.split(",")])
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
