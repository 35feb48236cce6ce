"""The matmul ceiling of evaluation: what this CPU's fp32 matmuls allow for a model, and a plain loop.

- `matmul_rate`: measured fp32 GEMM throughput on the model's own projection shapes (tokens x
  hidden times each distinct weight shape of a decoder layer, and a vocabulary block of the head),
  best shape and best of torch's two CPU GEMMs (MKL's `F.linear`, oneDNN on a reordered weight),
  in GFLOP per wall second and per CPU second (on a shared machine the second moves
  much less with other people's work).
- `flops_per_token`: 2 x (every linear weight of the decoder layers + the output head) plus the
  attention products (QK^T and AV) at the average causal context of a window.
- `time_breakdown`: where one batch's time goes (GEMMs, attention, everything else) on one thread,
  which is how far below the ceiling an evaluation built from torch's kernels must stay.
- `plain_loop`: the textbook evaluation loop on the same windows, for an equal-work ratio: full
  logits, float upcast, `F.cross_entropy`.
"""

from __future__ import annotations

import math
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn


def _linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    from frankenlab.pipeline.loading import decoder_layers

    shapes = {tuple(m.weight.shape) for m in decoder_layers(model)[0].modules() if isinstance(m, nn.Linear)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        shapes.add((min(1024, head.weight.shape[0]), head.weight.shape[1]))
    return sorted(shapes)


def _timed(fn, x, w, seconds: float) -> tuple[int, float, float]:
    """Calls of fn(x, w) in `seconds`: (calls, wall seconds, CPU seconds of the process)."""
    n = 0
    w0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds:
        fn(x, w)
        n += 1
    return n, time.perf_counter() - w0, time.process_time() - c0


def _side_by_side(fn, x, w, seconds: float, streams: int) -> tuple[int, float, float]:
    """`streams` threads of one intra-op thread each calling fn(x, w) at once, on the pool
    evaluation's side-by-side batches use (`evals.side_by_side.start_pool`): total calls, wall and
    CPU seconds."""
    from frankenlab.evals.side_by_side import start_pool

    start = threading.Barrier(streams + 1)

    def run() -> int:
        with torch.inference_mode():
            fn(x, w)  # warm-up on this thread
            start.wait()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn(x, w)
                n += 1
            return n

    pool = start_pool(streams, 1)
    try:
        futures = [pool.submit(run) for _ in range(streams)]
        start.wait()
        w0, c0 = time.perf_counter(), time.process_time()
        calls = sum(f.result() for f in futures)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        pool.shutdown(wait=True)
    return calls, wall, cpu


@torch.inference_mode()
def matmul_rate(model: nn.Module, tokens: int = 2048, seconds: float = 1.0) -> dict:
    """Best fp32 GFLOP/s over the model's weight shapes, x (tokens, in) @ W.T; wall and CPU seconds.

    Both GEMMs this torch offers on a CPU are timed, `F.linear` (MKL) and oneDNN on a weight
    reordered once (`evals.packed`, what evaluation uses), each as one call on all threads and (with
    two or more threads) as two single-thread streams at once (what evaluation's side-by-side
    batches do), and the fastest counts: the ceiling is what the machine's best fp32 matmul allows,
    not what one library or one way of threading reaches."""
    from frankenlab.evals.packed import Packs

    best = {"gflops_wall": 0.0, "gflops_cpu": 0.0, "shape": None, "gemm": None, "by_gemm": {}}
    packs = Packs()
    gemms = [("F.linear", F.linear)] + ([("oneDNN reordered", packs.linear)] if packs.enabled else [])
    streams = 2 if torch.get_num_threads() >= 2 else 0
    for out_f, in_f in _linear_shapes(model):
        x, w = torch.randn(tokens, in_f), torch.randn(out_f, in_f)
        flop = 2.0 * tokens * in_f * out_f
        for name, fn in gemms:
            fn(x, w)  # warm-up (and the one reorder)
            ways = [(name, lambda fn=fn, x=x, w=w: _timed(fn, x, w, seconds))]
            if streams:
                ways.append(
                    (
                        f"{name}, {streams} one-thread streams",
                        lambda fn=fn, x=x, w=w: _side_by_side(fn, x, w, seconds, streams),
                    )
                )
            for label, way in ways:
                n, wall, cpu = way()
                rate_w, rate_c = flop * n / wall / 1e9, flop * n / cpu / 1e9
                mine = best["by_gemm"].setdefault(label, {"gflops_wall": 0.0, "gflops_cpu": 0.0})
                mine["gflops_wall"], mine["gflops_cpu"] = (
                    max(mine["gflops_wall"], rate_w),
                    max(mine["gflops_cpu"], rate_c),
                )
                if rate_w > best["gflops_wall"]:
                    best.update(gflops_wall=rate_w, shape=(tokens, in_f, out_f), gemm=label)
                best["gflops_cpu"] = max(best["gflops_cpu"], rate_c)
        packs.clear()
    return best


def _weights(model: nn.Module) -> tuple[list, int, int]:
    """The decoder layers, their linear weights' element count, and the output head's (0 if none)."""
    from frankenlab.pipeline.loading import decoder_layers

    layers = decoder_layers(model)
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    head = model.lm_head.weight.numel() if isinstance(getattr(model, "lm_head", None), nn.Linear) else 0
    return layers, linear, head


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of a causal window of `seq_len`: linear layers, head, attention products."""
    layers, linear, head = _weights(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 2 * 2 * cfg.num_attention_heads * head_dim * (seq_len + 1) / 2 * len(layers)  # QK^T and AV, mean context
    return 2.0 * (linear + head) + attn


GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "mkl::_mkl_linear")


def time_breakdown(model: nn.Module, batch: int = 4, seq_len: int = 512) -> dict:
    """One (batch, seq_len) evaluation batch as `evals.perplexity` scores it, on one thread (what
    each side-by-side stream runs on), after a warm-up: its wall seconds and its operators' CPU
    seconds by kind (torch.profiler, self time), with the FLOPs each kind does.

    - gemm: the linear layers and the head's vocabulary blocks (`GEMM_OPS`);
    - attention: the fused attention kernel (any operator named *attention*);
    - other: norms, rotary, residual adds, the head's running logsumexp, copies.
    """
    from torch.profiler import ProfilerActivity, profile

    from frankenlab.evals.malloc import reuse_freed_memory
    from frankenlab.evals.packed import packed_linears
    from frankenlab.evals.perplexity import nll_sum

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g)
    _, linear, head = _weights(model)
    flops = {
        "gemm": 2.0 * batch * (seq_len * linear + (seq_len - 1) * head),
        "attention": batch * seq_len * (flops_per_token(model, seq_len) - 2.0 * (linear + head)),
    }
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(), reuse_freed_memory(), packed_linears(model) as packs:
            nll_sum(model, ids, ids, packs)  # warm-up: weights reordered, memory in the heap
            w0 = time.perf_counter()
            nll_sum(model, ids, ids, packs)
            wall = time.perf_counter() - w0
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                nll_sum(model, ids, ids, packs)
    finally:
        torch.set_num_threads(caller)
    seconds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        kind = "gemm" if ev.key in GEMM_OPS else "attention" if "attention" in ev.key else "other"
        seconds[kind] += ev.self_cpu_time_total / 1e6
    return {"wall_seconds": wall, "seconds": seconds, "flops": flops, "tokens": batch * seq_len}


@torch.inference_mode()
def plain_loop(model: nn.Module, windows: list[torch.Tensor], batch_size: int) -> tuple[float, int]:
    """Summed NLL and count the textbook way: model(ids).logits, upcast, cross-entropy. windows: (T,) each."""
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        ids = torch.stack(windows[b : b + batch_size])  # (B, T)
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        total += float(
            F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += ids[:, 1:].numel()
    return total, count


def ppl(nll: float, count: int) -> float:
    return math.exp(nll / count)
