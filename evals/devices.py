"""Every decision that depends on the device, in one place.

Stage, evaluation and sweep code asks here instead of `torch.cuda`, so one test can mock CUDA's
availability, device count and capability and check each decision on a CPU-only machine:

- `pick_device` / `pick_dtype` / `auto_dtype`: what "auto" means. fp32 on CPU (bf16 is about 2x
  slower on CPUs without AMX); on a GPU bf16 only where the card computes it natively (compute
  capability 8.0 or newer: A100, H100, RTX 30xx+), fp16 on older cards (T4, V100), which torch
  would otherwise run in emulated bf16.
- `resolved`: the device kind and dtype name a recipe's "auto" settles to here; sessions and sweep
  node keys carry these, never the literal "auto".
- `cpu_fast_paths`: the CPU-only evaluation speed-ups (oneDNN packed linears, glibc malloc tuning).
- `is_oom`, `free_cached_memory`, `oom_message`: out of memory, on any device, as one line.
- `local_sweep_slots`, `process_per_job`, `job_environment`: where a local sweep's jobs run.
- `ray_placement`, `task_device`: what a Ray task asks for, and the device it uses inside the task.
- `cpu_bf16_units`, `cpu_bf16_speedup`, `lora_precision`: what LoRA's `mixed_precision` runs as; on a CPU
  bf16 autocast only where it has bf16 matmul units (AMX, AVX-512-bf16) and a measurement says it pays.
- `cuda_quant_kernel`: which gptqmodel kernel a quantized model runs on a GPU (never gptqmodel's
  own "auto", which compiles and picks differently from box to box).
"""

from __future__ import annotations

import torch

from frankenlab.evals.errors import ModelLoadError, RecipeError

CPU_DTYPE = torch.float32
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
BF16_CAPABILITY = (8, 0)  # Ampere: native bf16 tensor cores


class DeviceError(RuntimeError):
    """A device setting this machine (or cluster) cannot honour; the message says what to do."""


# -- what CUDA offers -------------------------------------------------------------------------------
def cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver is no CUDA
        return False


def device_count() -> int:
    """Visible CUDA devices (after CUDA_VISIBLE_DEVICES), 0 without CUDA."""
    if not cuda_available():
        return 0
    try:
        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 0


def bf16_native(device: torch.device | str | None = None) -> bool:
    """Whether the CUDA device computes bf16 natively (not torch's emulation on older cards)."""
    if not cuda_available():
        return False
    try:
        index = torch.device(device).index if device is not None else None
        if tuple(torch.cuda.get_device_capability(index)) < BF16_CAPABILITY:
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no emulation flag, the capability decided
            return bool(torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001
        return False


def half_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The 16-bit float the GPU runs fast: bf16 where native, else fp16 (GPTQ, LoRA autocast)."""
    return torch.bfloat16 if bf16_native(device) else torch.float16


# -- "auto" ---------------------------------------------------------------------------------------
def pick_device(device: str | None = "auto") -> torch.device:
    device = device or "auto"
    if device == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if device.startswith("cuda") and not cuda_available():
        raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on CPU; on a GPU bf16 where native, else fp16."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_DTYPE
    return half_dtype(device)


def pick_dtype(dtype: str | None, device: torch.device | str) -> torch.dtype:
    if dtype in ("auto", "", None):
        return auto_dtype(device)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, float32, bfloat16, float16")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolved(device: str | None = "auto", dtype: str | None = "auto") -> dict:
    """{"device": "cpu" | "cuda", "dtype": "float32" | ...}: what a model spec loads as on this machine."""
    dev = pick_device(device)
    return {"device": dev.type, "dtype": dtype_name(pick_dtype(dtype, dev))}


def device_kind(device: str | None) -> str | None:
    """ "cuda:1" -> "cuda", "cpu" -> "cpu"; None stays None."""
    if not device:
        return None
    return str(device).split(":", 1)[0]


# -- CPU-only speed-ups -----------------------------------------------------------------------------
def model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def cpu_fast_paths(model_or_device) -> bool:
    """Whether CPU-only evaluation speed-ups apply: every weight of the model is on the CPU."""
    if isinstance(model_or_device, (torch.device, str)):
        return torch.device(model_or_device).type == "cpu"
    params = list(model_or_device.parameters()) + list(model_or_device.buffers())
    return all(p.device.type == "cpu" for p in params)


# -- LoRA's mixed precision: bf16 on a CPU only where it pays --------------------------------------
BF16_MIN_SPEEDUP = 1.5  # on the measured linear; a whole LoRA step gains less (casts, attention, element-wise)
_BF16_SPEEDUP: dict[str, float] = {}  # measured once per process


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix units by name ("AMX", "AVX-512-bf16"), or None where it has none
    (an AVX2 CPU: torch then emulates bf16 and it is slower than fp32)."""
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512-bf16"
    if flags:  # Linux listed the flags: none of them
        return None
    try:  # elsewhere: oneDNN's own check
        return "bf16 (oneDNN)" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except Exception:  # noqa: BLE001 - unknown: no units
        return None


def cpu_bf16_speedup(tokens: int = 1024, hidden: int = 576, out: int = 1536, reps: int = 4) -> float:
    """fp32 time / bf16-autocast time of a training-sized frozen linear on this CPU: its forward and
    the backward to its input (the two GEMMs of a frozen layer in LoRA training), the weight cast per
    call as autocast does. Best of `reps` each, interleaved, in CPU seconds of this process (other
    processes on a busy machine stretch wall time, not these); measured once per process (~1 s)."""
    key = f"{tokens}x{hidden}x{out}"
    if key not in _BF16_SPEEDUP:
        import time

        gen = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, hidden, generator=gen).requires_grad_(True)
        w = torch.randn(out, hidden, generator=gen)
        best = {False: float("inf"), True: float("inf")}
        for rep in range(reps + 1):
            for bf16 in (False, True):
                t0 = time.process_time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = torch.nn.functional.linear(x, w)
                y.float().sum().backward()
                x.grad = None
                if rep:  # the first round warms up
                    best[bf16] = min(best[bf16], time.process_time() - t0)
        _BF16_SPEEDUP[key] = best[False] / max(best[True], 1e-9)
    return _BF16_SPEEDUP[key]


def lora_precision(device: torch.device | str, setting: str) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, why) for LoRA's `mixed_precision` on `device`. Adapters and
    optimizer state stay fp32 either way. On a CPU "fp16" is refused (RecipeError); "bf16" runs as
    asked (and says when the CPU has no bf16 units); "auto" picks bf16 only where the CPU has bf16
    matmul units AND `cpu_bf16_speedup` measures it faster, else fp32."""
    device = torch.device(device)
    if setting == "no":
        return None, "mixed_precision = no"
    if device.type == "cuda":
        if setting == "fp16":
            return torch.float16, "asked for"
        if setting == "bf16":
            return torch.bfloat16, "asked for"
        half = half_dtype(device)
        why = "the GPU computes bf16 natively" if half is torch.bfloat16 else "the GPU has no native bf16"
        return half, f"auto: {why}"
    if device.type != "cpu":
        return None, f"auto: no mixed precision on {device.type}"
    if setting == "fp16":
        raise RecipeError('mixed_precision = "fp16" is not supported on a CPU: use "bf16", "auto" or "no"')
    units = cpu_bf16_units()
    if setting == "bf16":
        if units:
            return torch.bfloat16, f"asked for; this CPU has {units}"
        return torch.bfloat16, "asked for; this CPU has no bf16 matmul units, so it runs slower than fp32"
    if not units:
        return None, "auto: this CPU has no bf16 matmul units (AMX, AVX-512-bf16)"
    speedup = cpu_bf16_speedup()
    if speedup < BF16_MIN_SPEEDUP:
        return (
            None,
            f"auto: this CPU has {units} but bf16 measured {speedup:.2f}x fp32 here (needs {BF16_MIN_SPEEDUP}x)",
        )
    return torch.bfloat16, f"auto: this CPU has {units}; bf16 measured {speedup:.2f}x faster than fp32"


# -- out of memory ----------------------------------------------------------------------------------
def is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or a library's RuntimeError that says the same."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_cached_memory(device: torch.device | str | None = None) -> None:
    """Hand the CUDA caching allocator's free blocks back (after a stage, an evaluation, an OOM)."""
    if device is not None and torch.device(device).type != "cuda":
        return
    if not cuda_available():
        return
    try:
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - nothing to free is no failure
        pass


def oom_message(device: torch.device | str | None, what: str, lower: str) -> str:
    kind = device_kind(str(device)) if device is not None else None
    where = "GPU memory" if kind == "cuda" else "memory"
    return f"out of {where} {what}: {lower}"


def retry_smaller_batches(device: torch.device | str) -> bool:
    """Whether an evaluation batch that runs out of memory is retried in halves: on a GPU, where
    memory is a hard limit and the rest of the batch fits; a CPU that runs out is swapping, not helped."""
    return torch.device(device).type == "cuda"


def halving_on_oom(score, rows: int, *, device=None, start: int | None = None):
    """Run `score(begin, end)` over rows [0, rows) in chunks, halving the chunk after an out of memory
    (down to one row; a single row that does not fit raises). Returns the list of results, in row
    order, and the chunk size that worked (pass it on as `start` so later batches do not fail first)."""
    size = max(1, min(start or rows, rows))
    out, b = [], 0
    while b < rows:
        e = min(rows, b + size)
        try:
            out.append(score(b, e))
        except Exception as exc:
            if not is_oom(exc) or size == 1:
                raise
            free_cached_memory(device)
            size = max(1, size // 2)
            continue
        b = e
    return out, size


# -- sweeps: where jobs run -------------------------------------------------------------------------
def local_sweep_slots(device: str) -> list[str | None]:
    """One slot per GPU when the recipe may use CUDA and there are several; otherwise one slot
    (None: the job keeps its recipe's device)."""
    if device in ("auto", "cuda"):
        n = device_count()
        if n > 1:
            return [f"cuda:{i}" for i in range(n)]
    return [None]


def process_per_job(slots: list[str | None], forced: bool | None = None) -> bool:
    """Several GPUs: each job in its own process (gptqmodel uses every GPU it sees, and patches and
    log folders are per process). One slot (a CPU, one GPU): in this process, as before."""
    if forced is not None:
        return forced
    return len(slots) > 1


def job_environment(slot: str | None, base: dict | None = None) -> dict:
    """The environment of a job's own process: only its GPU visible (it is cuda:0 there)."""
    import os

    env = dict(os.environ if base is None else base)
    if slot and slot.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = slot.split(":", 1)[1]
    return env


def slot_device(slot: str | None, own_process: bool) -> str | None:
    """The device a job uses for its slot: in its own process its one visible GPU is cuda:0."""
    if slot is None:
        return None
    return "cuda" if own_process and slot.startswith("cuda") else slot


def ray_placement(device: str, resources: dict) -> tuple[int, str | None]:
    """(GPUs a Ray task asks for, or why the cluster cannot run the job). A recipe that names CUDA on a
    cluster without GPUs is refused at once: the task would wait for a GPU forever."""
    gpus = int(resources.get("GPU", 0) or 0)
    if device.startswith("cuda") and gpus == 0:
        return 0, (
            f"the recipe asks for device {device!r} but the Ray cluster has no GPU "
            f'(resources: {int(resources.get("CPU", 0) or 0)} CPUs): use device = "auto" or "cpu", '
            "or connect to a cluster with GPUs (--ray-address)"
        )
    return (1 if gpus > 0 and (device in ("auto",) or device.startswith("cuda")) else 0), None


def task_device(device: str | None) -> str | None:
    """Inside a Ray task (one GPU, made visible by Ray) "cuda:N" is that GPU: cuda:0."""
    if device and device.startswith("cuda:"):
        return "cuda"
    return device


# -- quantized models on a GPU: which gptqmodel kernel ------------------------------------------------
CUDA_QUANT_KERNEL_ENV = "FRANKENLAB_CUDA_QUANT_KERNEL"
# gptqmodel 7.6's GPTQ kernels for CUDA: bits, group sizes, symmetric only, in/out features divisible by,
# oldest compute capability. "torch" needs no compiled extension and is the default: the same kernel on
# every box. "marlin" (fastest for decoding) and "exllama_v2" compile an extension on first use.
CUDA_QUANT_KERNELS = {
    "torch": ((2, 3, 4, 8), None, False, 1, (0, 0)),
    "triton": ((2, 4, 8), None, False, 32, (7, 0)),
    "exllama_v2": ((4,), (-1, 32, 64, 128), False, 32, (6, 0)),
    "marlin": ((4, 8), (-1, 32, 64, 128), True, 1, (8, 0)),
}
DEFAULT_CUDA_QUANT_KERNEL = "torch"


def cuda_quant_kernel_choice(choice: str | None = None) -> str:
    """The kernel asked for: `choice`, else $FRANKENLAB_CUDA_QUANT_KERNEL, else "torch"; checked."""
    import os

    value = (choice or os.environ.get(CUDA_QUANT_KERNEL_ENV) or DEFAULT_CUDA_QUANT_KERNEL).strip().lower()
    if value not in CUDA_QUANT_KERNELS:
        raise DeviceError(
            f"unknown GPU kernel {value!r} for quantized models (${CUDA_QUANT_KERNEL_ENV}): "
            f"choose one of {', '.join(CUDA_QUANT_KERNELS)}"
        )
    return value


def cuda_quant_kernel(
    device: torch.device | str,
    *,
    bits: int,
    group_size: int,
    sym: bool = True,
    features: tuple[int, ...] = (),
    choice: str | None = None,
) -> tuple[str, str | None]:
    """(kernel, why the one asked for was not taken, or None) for a quantized model on a CUDA device.

    `features` are the model's linear widths (hidden, intermediate...). A kernel that cannot run the
    model (bits, group size, asymmetric codes, widths, the card's capability) falls back to "torch"."""
    want = cuda_quant_kernel_choice(choice)
    allowed_bits, groups, sym_only, divisible, capability = CUDA_QUANT_KERNELS[want]
    problems = []
    if bits not in allowed_bits:
        problems.append(f"{bits}-bit")
    if groups is not None and group_size not in groups:
        problems.append(f"group size {group_size}")
    if sym_only and not sym:
        problems.append("asymmetric codes")
    if any(f % divisible for f in features):
        problems.append(f"widths not multiples of {divisible}")
    card = _capability(device)
    if card is not None and card < capability:
        problems.append(f"compute capability {card[0]}.{card[1]} (needs {capability[0]}.{capability[1]})")
    if not problems:
        return want, None
    return "torch", f"the {want} kernel cannot run this model ({', '.join(problems)}): torch kernel"


def _capability(device: torch.device | str) -> tuple[int, int] | None:
    if not cuda_available():
        return None
    try:
        return tuple(torch.cuda.get_device_capability(torch.device(device).index))
    except Exception:  # noqa: BLE001 - unknown: let gptqmodel decide whether it runs
        return None
