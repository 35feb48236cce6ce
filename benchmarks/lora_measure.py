"""What `benchmarks.bench_lora` measures with: the machine, step clocks, peak memory, the training
ceiling and a profile grouped by kind (see bench_lora's docstring for what each figure means).

- `cpu_capability`: torch's CPU capability, the bf16/AMX flags of /proc/cpuinfo, oneDNN's bf16.
- `StepClock`: (wall, CPU) at the end of every step; `PeakRSS`: the process's peak resident memory.
- `train_flops_per_token`: forward + backward through the activations + the adapters' FLOPs per
  training token; `bf16_rate`: the best bf16 `F.linear` rate on the model's weight shapes.
- `group_profile`: torch.profiler operators' self CPU seconds by KINDS.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.ceiling import _linear_shapes, _timed, _weights, flops_per_token

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise", "mkl::_mkl_linear")
CE_OPS = ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")
KINDS = ("gemm", "attention", "head/cross-entropy", "optimizer", "element-wise/other")


# -- the machine -----------------------------------------------------------------------------------
def cpu_capability() -> dict:
    """torch's CPU capability, the bf16/AMX flags of /proc/cpuinfo, and whether oneDNN computes bf16."""
    flags: set[str] = set()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "model": model,
        "flags": {f: f in flags for f in CPU_FLAGS},
        "mkldnn_bf16": bool(mkldnn_bf16()) if mkldnn_bf16 else None,
        "bf16_units": any(f in flags for f in ("avx512_bf16", "amx_bf16")),
    }


# -- clocks and memory -----------------------------------------------------------------------------
class StepClock:
    """(wall, CPU) at the end of every step; `per_step` measures from the end of step 1 to the last."""

    def __init__(self, on_mark=None):
        self.marks: list[tuple[float, float]] = []
        self.losses: list[float] = []
        self.on_mark = on_mark

    def mark(self, loss: float | None = None) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))
        if loss is not None:
            self.losses.append(float(loss))
        if self.on_mark:
            self.on_mark(len(self.marks))

    def per_step(self) -> tuple[float, float, int]:
        """(wall seconds, CPU seconds, steps) from the end of step 1 to the end of the last step."""
        if len(self.marks) < 2:
            raise RuntimeError(f"{len(self.marks)} step(s) timed: at least 2 are needed (--steps 2 or more)")
        (w0, c0), (w1, c1) = self.marks[0], self.marks[-1]
        return w1 - w0, c1 - c0, len(self.marks) - 1


class PeakRSS:
    """The process's peak resident memory during a `with` block, in GiB, and how it was measured."""

    def __enter__(self):
        self.before = _status_kib("VmRSS") / 2**20
        self.method = "VmHWM reset via /proc/self/clear_refs"
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._stop = None
        except OSError:
            self.method = "VmRSS sampled every 10 ms"
            self._peak = self.before
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, _status_kib("VmRSS") / 2**20)

    def __exit__(self, *exc):
        if self._stop is None:
            self.peak = _status_kib("VmHWM") / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._peak, _status_kib("VmRSS") / 2**20)
        return False


def _status_kib(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# -- ceiling ---------------------------------------------------------------------------------------
def train_flops_per_token(model, seq_len: int, rank: int, targets) -> dict:
    """FLOPs one training token needs: forward, backward through activations, adapters (see the top)."""
    from frankenlab.pipeline.loading import decoder_layers

    layers, linear, head = _weights(model)
    forward = flops_per_token(model, seq_len)
    attention = forward - 2.0 * (linear + head)
    first = layers[0]
    first_qkv = sum(
        m.weight.numel()
        for n, m in first.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")
    )
    backward = 2.0 * (linear + head - first_qkv) + 2.0 * attention
    adapters = sum(
        6.0 * rank * (m.in_features + m.out_features)
        for layer in decoder_layers(model)
        for n, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
    )
    return {"forward": forward, "backward": backward, "adapters": adapters, "total": forward + backward + adapters}


@torch.inference_mode()
def bf16_rate(model, tokens: int = 2048, seconds: float = 1.0) -> dict:
    """Best bf16 `F.linear` GFLOP/s (wall and per CPU-second) on the model's weight shapes, all threads."""
    best = {"gflops_wall": 0.0, "gflops_cpu": 0.0, "shape": None}
    for out_f, in_f in _linear_shapes(model):
        x, w = torch.randn(tokens, in_f, dtype=torch.bfloat16), torch.randn(out_f, in_f, dtype=torch.bfloat16)
        F.linear(x, w)
        n, wall, cpu = _timed(F.linear, x, w, seconds)
        flop = 2.0 * tokens * in_f * out_f * n
        if flop / wall / 1e9 > best["gflops_wall"]:
            best.update(gflops_wall=flop / wall / 1e9, shape=(tokens, in_f, out_f))
        best["gflops_cpu"] = max(best["gflops_cpu"], flop / cpu / 1e9)
    return best


# -- where the time goes ---------------------------------------------------------------------------
# attention computed as batched GEMMs + softmax (pipeline.lora_speed.bf16_attention, eager attention):
# in a LLaMA decoder only attention uses batched matmuls and a plain softmax
ATTENTION_OPS = {"aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data"}


def classify(event, vocab: int, under_optimizer: bool) -> str:
    name = event.key if hasattr(event, "key") else event.name
    low = name.lower()
    if under_optimizer:
        return "optimizer"
    if "attention" in low or "scaled_dot_product" in low or name in ATTENTION_OPS:
        return "attention"
    shapes = getattr(event, "input_shapes", None) or []
    touches_vocab = any(isinstance(s, (list, tuple)) and vocab in s for s in shapes)
    if any(op in low for op in CE_OPS) or (touches_vocab and "embedding" not in low):
        return "head/cross-entropy"
    if name in GEMM_OPS:
        return "gemm"
    return "element-wise/other"


def group_profile(prof, vocab: int) -> dict:
    """Operators' self CPU seconds by kind; everything under Optimizer.step/zero_grad is the optimizer's."""
    seconds = dict.fromkeys(KINDS, 0.0)
    for e in prof.events():
        parent, under = e, False
        while parent is not None:
            if parent.name.startswith(("Optimizer.step", "Optimizer.zero_grad")):
                under = True
                break
            parent = parent.cpu_parent
        seconds[classify(e, vocab, under)] += e.self_cpu_time_total / 1e6
    return seconds
