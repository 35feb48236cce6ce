"""The CUDA path end to end, on a machine with a GPU: `python -m benchmarks.gpu_smoke` from the repo root.

Each check is timed and printed as it finishes (a failure prints its last line and the script goes on);
the parts, in order (`PARTS`; `--dry-run` prints them with their settings and builds the recipe and the
sweep, on any machine):

1. load: the model loads with dtype "auto" on the GPU (bf16 where the card computes it natively, fp16
   on older cards: `evals.devices.auto_dtype`);
2. fp32 vs bf16: perplexity in fp32 and in that 16-bit dtype on the same windows, their gap bounded;
3. recipe: depth -> width 2:4 -> LoRA -> GPTQ -> EoRA, evaluated after every stage (a few LoRA steps,
   a few windows), each stage's report checked (2:4 kept through the LoRA merge and GPTQ, EoRA adapters);
4. gptq report: the kernel recorded (session and report), the parameter counts and density equal to the
   saved checkpoint's read on the CPU;
5. quantized chat: the GPTQ folder reopened on the GPU with each kernel in --kernels (the torch kernel,
   then Marlin, which repacks its buffers): counts equal again, the first and second forward timed, and
   the time to the first chat token of it and of the final (EoRA) model;
6. two-GPU sweep: a local sweep whose two jobs run at once, one process per GPU (skipped, with a line,
   on a machine with one GPU);
7. Ray fail-fast: a Ray instance without GPUs refuses a job that wants CUDA at once, with a message.

On a machine without CUDA it prints "no CUDA device: nothing to check" and exits 0. Evaluation data
come from FRANKENLAB_DATA_DIR (or --data-dir); runs go to a temporary folder (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

PROTOCOL = "wikitext2-concat-512"
# (name, what it checks): the parts every run has, in order; `--dry-run` lists them
PARTS = (
    ("load", 'the model loads in dtype "auto" on the GPU'),
    ("fp32 vs bf16", "perplexity in fp32 and in the GPU's 16-bit dtype on the same windows"),
    ("recipe", "depth -> width 2:4 -> LoRA -> GPTQ -> EoRA, evaluated after every stage"),
    ("gptq report", "the GPTQ report's kernel, counts and density equal the saved checkpoint's"),
    ("quantized chat", "the quantized folders on the GPU: counts, forwards, time to the first chat token"),
    ("two-GPU sweep", "a local sweep with one process per GPU, two jobs at once (skipped with one GPU)"),
    ("ray fail-fast", "a Ray instance without GPUs refuses a CUDA job at once"),
)
RECIPE_KINDS = ("depth", "width", "lora", "gptq", "eora")
MAX_HALF_GAP = 0.05  # bf16/fp16 perplexity within 5 % of fp32's on the same windows
RAY_WAIT_S = 120.0  # a refusal that takes longer than this is not "at once"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("FRANKENLAB_DATA_DIR"))
    p.add_argument("--model", default="default", help="model to check (default: the bundled one)")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows per evaluation")
    p.add_argument("--lora-steps", type=int, default=20, help="LoRA optimizer steps in the recipe")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--kernels", default="torch,marlin", help="GPU kernels to reopen the GPTQ folder with")
    p.add_argument("--dry-run", action="store_true", help="print the checks and their settings; run nothing")
    return p.parse_args(argv)


def recipe_dict(args) -> dict:
    """The full recipe, small settings: about a minute of GPU work for the bundled model."""
    return {
        "name": "gpu-smoke",
        "model": {"source": args.model, "device": "auto", "dtype": "auto"},
        "calibration": {"samples": 16, "seq_len": 256},
        "evaluation": {"perplexity": [PROTOCOL], "ppl_limit": args.windows, "samples": False, "after": "each"},
        "stages": [
            {"kind": "depth", "k": 2, "samples": 4},
            {"kind": "width", "pattern": "2:4"},
            {"kind": "lora", "steps": args.lora_steps, "batch_size": 4, "seq_len": 256},
            {"kind": "gptq", "bits": 4, "group_size": 128, "samples": 16},
            {"kind": "eora", "rank": 16, "samples": 16},
        ],
    }


def sweep_text(args) -> str:
    """Two width nodes under one baseline: two jobs that can run at once, one per GPU."""
    return f"""
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
"width.pattern" = ["2:4", "4:8"]
"""


def plan(args) -> list[str]:
    """The lines `--dry-run` prints: every part, the recipe's stages and the sweep's nodes, all built
    (a recipe or sweep these checks could not run fails here, on any machine)."""
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions.sweep import parse_sweep

    recipe = Recipe.from_dict(recipe_dict(args))
    sweep = parse_sweep(sweep_text(args), "gpu-smoke.toml")
    stages = " -> ".join(
        s.kind
        + (f" {s.config.n}:{s.config.m}" if s.kind == "width" else "")
        + (f" {s.config.steps} steps" if s.kind == "lora" else "")
        for s in recipe.stages
    )
    lines = [f"{i}. {name}: {what}" for i, (name, what) in enumerate(PARTS, 1)]
    lines.append(f"recipe: {stages}; evaluation after {recipe.evaluation.after} stage, {args.windows} windows")
    lines.append(f"sweep: {sweep.name}, axes " + "; ".join(f"{a.name} = {list(a.values)}" for a in sweep.axes))
    lines.append(f"kernels: {args.kernels}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for line in plan(args):
            print(line)
        return 0
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
            status = "skipped" if isinstance(value, Skipped) else "ok"
        except Exception as exc:  # noqa: BLE001 - every check runs; the summary says which failed
            traceback.print_exc(file=sys.stderr)
            value, status = None, f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:] or ''}"
        seconds = time.perf_counter() - t0
        results.append((name, status, seconds))
        print(f"{name:<44} {status:<8} {seconds:8.1f} s  {value if value is not None else ''}", flush=True)
        return value

    from frankenlab.pipeline.loading import load_model

    state: dict = {}
    lm = check("1. load (auto dtype)", lambda: _load(load_model, args.model))
    if lm is not None:
        half = lm.dtype
        check(f"2. perplexity fp32 vs {devices.dtype_name(half)}", lambda: _fp32_vs_half(args, lm, load_model))
        del lm
        devices.free_cached_memory("cuda")
    check("3. recipe depth > width 2:4 > LoRA > GPTQ > EoRA", lambda: _recipe(args, out / "recipe", state))
    if "session" in state:
        reference = check("4. GPTQ report = saved checkpoint (CPU)", lambda: _gptq_report(state["session"], state))
        for kernel in [k.strip() for k in args.kernels.split(",") if k.strip()]:
            if reference is not None:
                check(
                    f"5. GPTQ folder on the GPU, {kernel} kernel", lambda kernel=kernel: _gptq_reopened(state, kernel)
                )
        if state.get("final"):
            check("5. final (EoRA) model: first chat token", lambda: _first_chat_token(state["final"]))
    check(f"6. two-GPU local sweep ({n} GPU(s))", lambda: _sweep(args, out / "sweep", n))
    check("7. Ray without GPUs refuses a CUDA job", _ray_fail_fast)
    failed = [r for r in results if r[1] not in ("ok", "skipped")]
    skipped = sum(r[1] == "skipped" for r in results)
    print(
        f"{len(results) - len(failed) - skipped} of {len(results)} checks passed"
        + (f", {skipped} skipped" if skipped else "")
        + f" in {sum(r[2] for r in results):.0f} s"
    )
    return 1 if failed else 0


class Skipped(str):
    """A check that does not apply on this machine: its line says why."""


def _load(load_model, ref):
    from frankenlab.evals import devices

    lm = load_model(ref, device="auto", dtype="auto")
    assert lm.device.type == "cuda", f"auto loaded on {lm.device}"
    assert lm.dtype == devices.auto_dtype(lm.device), f"auto loaded as {lm.dtype}"
    return lm


def _fp32_vs_half(args, lm, load_model) -> str:
    """The same windows in the 16-bit dtype the GPU runs ("auto") and in fp32: the gap is bounded."""
    from frankenlab.evals import devices
    from frankenlab.evals.perplexity import perplexity

    half = perplexity(lm.model, lm.tokenizer, PROTOCOL, data_dir=args.data_dir, limit=args.windows)
    fp32 = load_model(args.model, device="cuda", dtype="float32")
    try:
        full = perplexity(fp32.model, fp32.tokenizer, PROTOCOL, data_dir=args.data_dir, limit=args.windows)
    finally:
        del fp32
        devices.free_cached_memory("cuda")
    assert half.tokens == full.tokens, f"different windows: {half.tokens} vs {full.tokens} tokens"
    gap = half.value / full.value - 1
    line = (
        f"fp32 {full.value:.3f}, {devices.dtype_name(lm.dtype)} {half.value:.3f} ({gap:+.2%}) on {full.tokens} tokens"
    )
    assert abs(gap) < MAX_HALF_GAP, f"{line}: more than {MAX_HALF_GAP:.0%} apart"
    return line


def _recipe(args, out: Path, state: dict) -> str:
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions.recorder import record_run

    session = record_run(Recipe.from_dict(recipe_dict(args)), out, data_dir=args.data_dir)
    state["session"] = session
    if session.status != "done":
        raise RuntimeError(next((st.error for st in session.stages if st.error), session.status))
    kinds = tuple(st.kind for st in session.stages[1:])
    assert kinds == RECIPE_KINDS, f"stages {kinds}"
    env = session.environment
    assert env.get("device") == "cuda", f"the recipe ran on {env.get('device')}"
    ppl = [st.metric("perplexity") for st in session.stages]
    assert all(ppl), (
        f"stages without perplexity: {[st.kind for st, m in zip(session.stages, ppl, strict=True) if not m]}"
    )
    by_kind = {st.kind: st for st in session.stages}
    lora, gptq, eora = by_kind["lora"].report, by_kind["gptq"].report, by_kind["eora"].report
    assert str(lora.get("sparsity", "")).startswith("mask re-applied"), f"LoRA merge: {lora.get('sparsity')}"
    assert gptq.get("pattern_holds") is True, f"masked GPTQ lost the 2:4 zeros: {gptq.get('zeros_kept_fraction')}"
    assert eora.get("layers_with_adapter"), "EoRA put no adapter on any layer"
    state["final"] = by_kind["eora"].artifact
    steps = ", ".join(f"{st.kind} {st.seconds or 0:.0f} s" for st in session.stages[1:])
    return (
        f"{env.get('device')} {env.get('dtype')}; perplexity "
        + " > ".join(f"{m['value']:.2f}" for m in ppl)
        + f"; {steps}"
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
    first = _time_first_token(model, lm.tokenizer)
    got = getattr(model, "frankenlab_backend", None)
    text = quant.kernel_description(model)
    del lm, model
    devices.free_cached_memory("cuda")
    return (
        f"{text}; counts = checkpoint; forward 64 tokens: first {times[0]:.2f} s, then {times[1]:.3f} s; "
        f"first chat token {first:.2f} s" + ("" if got == kernel else f" (asked {kernel}, runs {got})")
    )


def _first_chat_token(folder: str) -> str:
    """The final model (GPTQ + EoRA adapter) opened on the GPU as the lab's chat opens it: first token timed."""
    from frankenlab.evals import devices
    from frankenlab.pipeline.loading import load_model

    t0 = time.perf_counter()
    lm = load_model(folder, device="cuda", dtype="auto")
    loaded = time.perf_counter() - t0
    assert lm.device.type == "cuda", f"opened on {lm.device}"
    first = _time_first_token(lm.model, lm.tokenizer)
    del lm
    devices.free_cached_memory("cuda")
    return f"opened in {loaded:.1f} s; first chat token {first:.2f} s"


def _time_first_token(model, tokenizer) -> float:
    from frankenlab.tui.chat import stream_reply

    t0 = time.perf_counter()
    for _piece in stream_reply(model, tokenizer, [{"role": "user", "content": "Who wrote Hamlet?"}], max_new_tokens=8):
        return time.perf_counter() - t0
    raise AssertionError("the reply had no token at all")


def _sweep(args, out: Path, gpus: int) -> str:
    """Two width jobs at once, each in its own process with its own GPU (CUDA_VISIBLE_DEVICES)."""
    if gpus < 2:
        return Skipped(f"skipped: {gpus} GPU here, the two-GPU sweep needs 2 or more")
    from frankenlab.sessions.sweep import parse_sweep, run_sweep
    from frankenlab.sessions.sweep.executors import LocalExecutor

    executor = LocalExecutor("auto")
    assert executor.slots == gpus and executor.own_process, (
        f"{executor.slots} slot(s), process per job {executor.own_process} with {gpus} GPUs"
    )
    record = run_sweep(parse_sweep(sweep_text(args), "gpu-smoke.toml"), out, executor=executor, data_dir=args.data_dir)
    if record["status"] != "done":
        bad = [n.get("error") for n in record["nodes"].values() if n.get("error")]
        raise RuntimeError(bad[0] if bad else record["status"])
    spans = [(n["started"], n["finished"]) for n in record["nodes"].values() if n.get("kind") == "width"]
    overlap = max(0.0, min(e for _, e in spans) - max(s for s, _ in spans)) if len(spans) >= 2 else 0.0
    return (
        f"{len(record['nodes'])} nodes, {record['runs'][-1]['nodes_computed']} computed on {executor.slots} GPUs, "
        f"one process each; the two width jobs overlapped {overlap:.1f} s"
    )


def _ray_fail_fast(wait_s: float = RAY_WAIT_S) -> str:
    """A local Ray instance started without GPUs (as a cluster without any) and a sweep executor asked for
    CUDA on it: refused at once with a one-line message, never a task waiting for a GPU forever."""
    import ray

    from frankenlab.evals import devices
    from frankenlab.sessions.sweep.executors import RayExecutor

    ray.init(num_gpus=0, num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        outcome: dict = {}

        def attempt():
            try:
                RayExecutor(device="cuda")
                outcome["error"] = None
            except Exception as exc:  # noqa: BLE001 - judged below
                outcome["error"] = exc

        t0 = time.perf_counter()
        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(wait_s)
        seconds = time.perf_counter() - t0
        assert not thread.is_alive(), f"still waiting after {wait_s:.0f} s for a GPU the cluster does not have"
        err = outcome["error"]
        assert err is not None, "a CUDA job was accepted on a Ray cluster without GPUs"
        assert isinstance(err, devices.DeviceError), f"{type(err).__name__}: {err}"
        assert "has no GPU" in str(err) and "\n" not in str(err), str(err)
        return f"refused in {seconds:.2f} s: {err}"
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
