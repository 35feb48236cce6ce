"""Sweep benchmark (prints figures; never asserted): shared prefixes against independent runs, and Ray's cost.

A 6-configuration grid (Depth 1/2 x Width 1:8/2:4/4:8) run three ways, each into a fresh folder:
  shared       `run_sweep` on this machine: the baseline and each depth computed once (10 nodes)
  independent  the same 6 recipes one after another with `record_run`, as `frankenlab run` would
               (each evaluates its own baseline and prunes its own depth: 6 x 3 stages)
  ray          `run_sweep` with Ray tasks on a local Ray instance started here (`--ray-cpus`)
Wall time, CPU seconds (this process, plus the Ray workers' own from each job's result) and the
load average (this machine is often shared: read the figures with it). Ray's overhead per job is
(ray wall - shared wall) / jobs, with Ray's start-up printed apart.
Usage: python -m benchmarks.bench_sweep [--model tiny|default|PATH] [--data-dir DIR] [--ray-cpus 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GRID = """
name = "bench"
[base]
model = "{model}"
[base.calibration]
samples = {samples}
seq_len = 128
[base.evaluation]
perplexity = ["wikitext2-concat-{seq}"]
ppl_limit = 4
samples = false
[[base.stages]]
kind = "depth"
k = 1
[[base.stages]]
kind = "width"
pattern = "1:8"
[axes]
"depth.k" = [1, 2]
"width.pattern" = ["1:8", "2:4", "4:8"]
"""


def cpu() -> float:
    """CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(label: str, fn):
    load0, c0, t0 = os.getloadavg()[0], cpu(), time.perf_counter()
    result = fn()
    wall, used = time.perf_counter() - t0, cpu() - c0
    print(
        f"{label:<12} wall {wall:7.1f} s   cpu {used:7.1f} s   load {load0:.2f} -> {os.getloadavg()[0]:.2f}", flush=True
    )
    return wall, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (a random 8-layer LLaMA built here), default, or a path")
    ap.add_argument("--data-dir", default=os.environ.get("FRANKENLAB_DATA_DIR"))
    ap.add_argument("--ray-cpus", type=int, default=1, help="CPUs of the local Ray instance (1 = one job at a time)")
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()

    from frankenlab.tui.cli.main import _quiet_libraries

    _quiet_libraries()
    from frankenlab.sessions import record_run
    from frankenlab.sessions.sweep import RayExecutor, parse_sweep, run_sweep

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    model = args.model
    if model == "tiny":
        from tests.tiny import build_tiny_llama

        model = str(build_tiny_llama(work / "tiny"))
    small = args.model == "tiny"
    sweep = parse_sweep(GRID.format(model=model, samples=8 if small else 16, seq=64 if small else 256))
    configs = sweep.expand()
    print(
        f"{len(configs)} configurations on {args.model}; {os.cpu_count()} CPU(s); load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; work folder {work}",
        flush=True,
    )

    shared_wall, rec = timed("shared", lambda: run_sweep(sweep, work / "shared", data_dir=args.data_dir))
    jobs = rec["runs"][-1]["jobs"]
    print(f"             {len(rec['nodes'])} nodes in {jobs} jobs; shared-prefix hits {rec['cache_hits']['shared']}")
    indep_wall, _ = timed(
        "independent",
        lambda: [record_run(c.recipe, work / "independent" / c.slug, data_dir=args.data_dir) for c in configs],
    )
    print(f"ratio        independent / shared = {indep_wall / shared_wall:.2f}x", flush=True)
    if args.no_ray:
        return
    t0 = time.perf_counter()
    executor = RayExecutor(num_cpus=args.ray_cpus)
    start = time.perf_counter() - t0
    print(f"ray start    {start:.1f} s (ray.init, {args.ray_cpus} CPU(s))", flush=True)
    try:
        ray_wall, rrec = timed("ray", lambda: run_sweep(sweep, work / "ray", executor=executor, data_dir=args.data_dir))
    finally:
        executor.close()
    worker_cpu = sum(n.get("cpu_seconds") or 0.0 for n in rrec["nodes"].values())
    local_cpu = sum(n.get("cpu_seconds") or 0.0 for n in rec["nodes"].values())
    rjobs = rrec["runs"][-1]["jobs"]
    print(f"             job CPU seconds: ray workers {worker_cpu:.1f} s, local jobs {local_cpu:.1f} s")
    print(
        f"ray overhead per job: {(ray_wall - shared_wall) / max(1, rjobs):+.2f} s wall "
        f"({rjobs} jobs; plus {start:.1f} s start-up once)"
    )


if __name__ == "__main__":
    main()
