"""The CUDA path end to end, on a machine with a GPU: `python -m benchmarks.gpu_smoke` from the repo root.

Checks, each timed, each printed as it finishes (a failure prints its last line and the script goes on):
1. the bundled model loads with dtype "auto" on the GPU (bf16 where the card computes it natively,
   fp16 on older cards: `pipeline.devices.auto_dtype`);
2. perplexity on a few windows in that dtype, beside fp32 on the GPU on the same windows;
3. a recipe width 2:4 -> GPTQ (the stage in whatever process it uses) with evaluation after each stage;
4. that GPTQ stage's report and counts: the kernel recorded (session and report), its parameter counts
   and density equal to the saved checkpoint's read on the CPU; the folder reopened on the GPU with
   each kernel in --kernels (the torch kernel, then Marlin, which repacks its buffers): counts equal
   again, time of the first and second forward and of the first chat token printed;
5. a local sweep of two nodes (baseline and width 2:4), one process per GPU when there are two or more.
On a machine without CUDA it prints "no CUDA device: nothing to check" and exits 0. Evaluation data
come from FRANKENLAB_DATA_DIR (or --data-dir); runs go to a temporary folder (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

PROTOCOL = "wikitext2-concat-512"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("FRANKENLAB_DATA_DIR"))
    p.add_argument("--model", default="default", help="model to check (default: the bundled one)")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows per evaluation")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--kernels", default="torch,marlin", help="GPU kernels to reopen the GPTQ folder with")
    args = p.parse_args(argv)

    from frankenlab.evals import devices

    if not devices.cuda_available():
        print("no CUDA device: nothing to check")
        return 0
    import torch

    out = Path(args.out or tempfile.mkdtemp(prefix="frankenlab-gpu-smoke-"))
    n = devices.device_count()
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
    cap = torch.cuda.get_device_capability(0)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {n} GPU(s): {names}; capability {cap[0]}.{cap[1]}")
    print(f"auto dtype here: {devices.dtype_name(devices.auto_dtype('cuda'))}; runs in {out}")
    results: list[tuple[str, str, float]] = []

    def check(name: str, fn) -> object:
        t0 = time.perf_counter()
        try:
            value = fn()
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - every check runs; the summary says which failed
            traceback.print_exc(file=sys.stderr)
            value, status = None, f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:] or ''}"
        seconds = time.perf_counter() - t0
        results.append((name, status, seconds))
        print(f"{name:<44} {status:<8} {seconds:8.1f} s  {value if value is not None else ''}", flush=True)
        return value

    from frankenlab.evals.perplexity import perplexity
    from frankenlab.pipeline.loading import load_model

    lm = check("load (auto dtype)", lambda: _load(load_model, args.model))
    if lm is not None:
        check(
            f"perplexity {lm.dtype} ({args.windows} windows)",
            lambda: perplexity(lm.model, lm.tokenizer, PROTOCOL, data_dir=args.data_dir, limit=args.windows).value,
        )
        del lm
        devices.free_cached_memory("cuda")
    fp32 = check("load fp32 on the GPU", lambda: load_model(args.model, device="cuda", dtype="float32"))
    if fp32 is not None:
        check(
            f"perplexity fp32 ({args.windows} windows)",
            lambda: perplexity(fp32.model, fp32.tokenizer, PROTOCOL, data_dir=args.data_dir, limit=args.windows).value,
        )
        del fp32
        devices.free_cached_memory("cuda")
    state: dict = {}
    check("recipe width 2:4 > GPTQ, evaluated", lambda: _recipe(args, out / "recipe", state))
    if "session" in state:
        reference = check("GPTQ report = saved checkpoint (CPU)", lambda: _gptq_report(state["session"], state))
        for kernel in [k.strip() for k in args.kernels.split(",") if k.strip()]:
            if reference is not None:
                check(f"GPTQ folder on the GPU, {kernel} kernel", lambda kernel=kernel: _gptq_reopened(state, kernel))
    check(f"local sweep of two nodes ({max(n, 1)} slot(s))", lambda: _sweep(args, out / "sweep"))
    failed = [r for r in results if r[1] != "ok"]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed")
    return 1 if failed else 0


def _load(load_model, ref):
    lm = load_model(ref, device="auto", dtype="auto")
    assert lm.device.type == "cuda", f"auto loaded on {lm.device}"
    return lm


def _recipe(args, out: Path, state: dict) -> str:
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions.recorder import record_run

    recipe = Recipe.from_dict(
        {
            "name": "gpu-smoke",
            "model": {"source": args.model, "device": "auto", "dtype": "auto"},
            "calibration": {"samples": 16, "seq_len": 256},
            "evaluation": {"perplexity": [PROTOCOL], "ppl_limit": args.windows, "samples": False},
            "stages": [{"kind": "width", "pattern": "2:4"}, {"kind": "gptq", "bits": 4, "group_size": 128}],
        }
    )
    session = record_run(recipe, out, data_dir=args.data_dir)
    state["session"] = session
    if session.status != "done":
        raise RuntimeError(next((st.error for st in session.stages if st.error), session.status))
    ppl = [st.metric("perplexity") for st in session.stages]
    env = session.environment
    return f"{env.get('device')} {env.get('dtype')}; perplexity " + " > ".join(
        f"{m['value']:.2f}" if m else "-" for m in ppl
    )


def _gptq_report(session, state: dict) -> str:
    """The GPTQ stage ran on the GPU: kernel recorded, counts and density = the checkpoint's, read on the CPU."""
    from frankenlab.pipeline import quant
    from frankenlab.pipeline.loading import count_parameters
    from frankenlab.pipeline.stages.gptq import sparsity_after

    st = next(s for s in session.stages if s.kind == "gptq")
    r = st.report
    assert r.get("backend"), f"no kernel recorded in the report: {r.get('kernel')}"
    assert session.environment.get("quant_kernel"), "no quant_kernel in the session's environment"
    assert r.get("pattern_holds") is True, f"masked GPTQ lost zeros: {r.get('zeros_kept_fraction')}"
    folder = r["quantized_path"]
    cpu = quant.load_quantized(folder, device="cpu").model  # torch kernels on the CPU: the saved packing itself
    counts = (count_parameters(cpu), count_parameters(cpu, nonzero=True))
    assert (st.params_count, st.params_nonzero) == counts, f"stage {st.params_count, st.params_nonzero} != {counts}"
    density = sparsity_after(cpu, {})["density_after"]
    assert abs(r["density_after"] - density) < 1e-12, f"report density {r['density_after']} != checkpoint {density}"
    state.update(folder=folder, counts=counts)
    del cpu
    return f"kernel {r['backend']} (session: {session.environment['quant_kernel']}); params {counts[0]}/{counts[1]}"


def _gptq_reopened(state: dict, kernel: str) -> str:
    """The GPTQ folder opened on the GPU with `kernel`: counts = the checkpoint's, forwards and a chat token timed."""
    import torch

    from frankenlab.evals import devices
    from frankenlab.pipeline import quant
    from frankenlab.pipeline.loading import count_parameters, load_model
    from frankenlab.tui.chat import stream_reply

    old = os.environ.get(devices.CUDA_QUANT_KERNEL_ENV)
    os.environ[devices.CUDA_QUANT_KERNEL_ENV] = kernel
    try:
        lm = load_model(state["folder"], device="cuda", dtype="auto")
    finally:
        if old is None:
            os.environ.pop(devices.CUDA_QUANT_KERNEL_ENV, None)
        else:
            os.environ[devices.CUDA_QUANT_KERNEL_ENV] = old
    model = lm.model
    counts = (count_parameters(model), count_parameters(model, nonzero=True))
    assert counts == state["counts"], f"{counts} != checkpoint {state['counts']}"
    ids = torch.randint(3, 1000, (1, 64), device="cuda")
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    first = None
    for _piece in stream_reply(
        model, lm.tokenizer, [{"role": "user", "content": "Who wrote Hamlet?"}], max_new_tokens=8
    ):
        first = first or time.perf_counter() - t0
    got = getattr(model, "frankenlab_backend", None)
    text = quant.kernel_description(model)
    del lm, model
    devices.free_cached_memory("cuda")
    return (
        f"{text}; counts = checkpoint; forward 64 tokens: first {times[0]:.2f} s, then {times[1]:.3f} s; "
        f"first chat token {first if first is not None else float('nan'):.2f} s"
        + ("" if got == kernel else f" (asked {kernel}, runs {got})")
    )


def _sweep(args, out: Path) -> str:
    from frankenlab.sessions.sweep import parse_sweep, run_sweep

    text = f"""
name = "gpu-smoke"
[base]
model = {{ source = "{args.model}", device = "auto" }}
[base.evaluation]
perplexity = ["{PROTOCOL}"]
ppl_limit = {args.windows}
samples = false
[[base.stages]]
kind = "width"
pattern = "2:4"
[axes]
"width.pattern" = ["2:4"]
"""
    record = run_sweep(parse_sweep(text, "gpu-smoke.toml"), out, data_dir=args.data_dir)
    if record["status"] != "done":
        bad = [n.get("error") for n in record["nodes"].values() if n.get("error")]
        raise RuntimeError(bad[0] if bad else record["status"])
    return f"{len(record['nodes'])} nodes, {record['runs'][-1]['nodes_computed']} computed"


if __name__ == "__main__":
    sys.exit(main())
