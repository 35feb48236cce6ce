"""The LoRA stage's CPU speed-ups under bf16 autocast, each one either exact or with a stated tolerance.

Measured on the bundled model (8 x 256 tokens per step, AVX-512-bf16 CPU, `benchmarks/bench_lora.py`):
under `torch.autocast("cpu", bfloat16)` the GEMMs already run at the bf16 rate, and what is left is
work around them. `fast_training` removes four pieces of it for the duration of training:

- **Frozen weights stored in bf16** (`frozen_weights_in`): autocast never caches a cast of a weight
  that needs no gradient, so every forward re-cast every frozen linear (and the head once per chunk).
  The frozen linears get bf16 copies for the run and their fp32 weights back afterwards, before the
  merge: exact (autocast's cast and `.to(bfloat16)` round alike), 270 MB more for 135 M parameters.
- **Dropout masks from 16 random bits** (`FastDropout`): `nn.Dropout` draws one Bernoulli per element
  through a single-threaded generator (7.5 ms per 8 x 256 x 576 input, 120 inputs per step). Four
  16-bit lanes per 64-bit draw give the mask at a fifth of the cost. Tolerance: the drop probability
  is rounded to a multiple of 2^-16 (0.1 -> 0.100006) and kept values are scaled by the exact inverse
  of the kept fraction, so the expectation is unchanged; the masks differ from torch's (another RNG
  stream), as they would under another seed.
- **Attention as two bf16 GEMMs** (`bf16_attention`): the CPU flash kernel is slower in bf16 than in
  fp32 here, while scores and values through bf16 GEMMs (grouped-query heads folded into the rows, no
  `repeat_kv` copy) are faster. Tolerance: scores and probabilities are rounded to bf16, as in eager
  attention on a GPU in bf16; used only while the stored scores of all layers fit `ATTENTION_BYTES`,
  else the model's own attention runs.
- **The heap kept between steps** (`kept_heap`, glibc only): each step frees and re-allocates the same
  buffers; glibc returns the large ones to the kernel and the next step page-faults them back in
  (about 1 CPU-s of kernel time per step). For the run, buffers up to 32 MiB stay in the heap and
  freed memory is not trimmed; afterwards trimming is restored and the heap trimmed once.

All of it is CPU-only: on CUDA the autocast casts and dropout are cheap and nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "frankenlab_cpu_bf16"
ATTENTION_BYTES = 1 << 30  # stored bf16 scores + probabilities of all layers for one micro-batch
MMAP_THRESHOLD = 32 << 20  # glibc's largest mmap threshold: buffers up to this stay in the heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DEFAULT_TRIM = 128 * 1024


# -- frozen weights in bf16 ------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_weights_in(model: nn.Module, dtype: torch.dtype):
    """Every frozen `nn.Linear` weight of `model` as a `dtype` copy for the block (a tied head gets
    its own copy: the embeddings stay as they are), the original parameters back afterwards."""
    swapped: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if type(mod) is nn.Linear and isinstance(w, nn.Parameter) and not w.requires_grad and w.dtype != dtype:
                if not w.dtype.is_floating_point:
                    continue
                swapped.append((mod, w))
                mod.weight = nn.Parameter(w.detach().to(dtype), requires_grad=False)
        yield len(swapped)
    finally:
        for mod, w in swapped:
            mod.weight = w


# -- dropout ---------------------------------------------------------------------------------------
class FastDropout(nn.Module):
    """Inverted dropout with masks from 16-bit random lanes (see the module doc for its tolerance)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 65536)  # drop where the 16-bit lane (unsigned) is below this
        self.scale = 65536.0 / (65536 - self.threshold)

    def extra_repr(self) -> str:
        return f"p={self.p} (drops {self.threshold}/65536)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        lanes = words.view(torch.int16)[:n].view(x.shape)  # signed: unsigned u >= t  <=>  s >= t - 32768
        keep = lanes >= self.threshold - 32768
        return x * (keep.to(x.dtype) * self.scale)


def fast_dropout(peft_model: nn.Module) -> int:
    """PEFT's `lora_dropout` modules (nn.Dropout) replaced by `FastDropout` of the same probability."""
    n = 0
    for mod in peft_model.modules():
        drops = getattr(mod, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for key in list(drops.keys()):
                if type(drops[key]) is nn.Dropout and drops[key].p > 0:
                    drops[key] = FastDropout(drops[key].p)
                    n += 1
    return n


# -- attention -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _causal_bias(t: int, s: int, g: int, device: str) -> torch.Tensor:
    """(g*t, s) bf16: 0 where query row i (of each of g heads) may see key j, -inf after it."""
    future = torch.ones(t, s, dtype=torch.bool, device=device).triu(s - t + 1)
    bias = torch.zeros(t, s, dtype=torch.bfloat16, device=device).masked_fill_(future, float("-inf"))
    return bias.repeat(g, 1)


def bf16_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention as bf16 GEMMs: query (B, H, T, D), key/value (B, KV, S, D); returns (B, T, H, D), None.
    Grouped-query heads share their key/value head by folding the group into the rows of one GEMM; the
    scale and the mask ride in the scores' GEMM (`baddbmm`: no separate scaling or masking pass)."""
    b, h, t, d = query.shape
    kv, s = key.shape[1], key.shape[2]
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # a per-head mask

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    g = h // kv
    dt = torch.bfloat16
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    q = query.to(dt).reshape(b * kv, g * t, d)
    k_t = key.to(dt).reshape(b * kv, s, d).transpose(1, 2)
    causal = t > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if attention_mask is not None:  # (B, 1, T, S): bool (True = attend) or additive floats
        m = attention_mask
        bias = (
            torch.zeros(m.shape, dtype=dt, device=m.device).masked_fill_(~m, float("-inf"))
            if m.dtype == torch.bool
            else m.to(dt)
        )
        bias = bias[:, :, None].expand(b, kv, g, t, s).reshape(b * kv, g * t, s)
    elif causal:
        bias = _causal_bias(t, s, g, str(query.device))
    else:
        bias = None
    if bias is None:
        scores = torch.bmm(q, k_t) * scale
    else:
        scores = torch.baddbmm(bias, q, k_t, alpha=scale)  # (B*KV, g*T, S)
    probs = scores.softmax(-1)
    if dropout and module.training:
        probs = F.dropout(probs, dropout, True)
    out = torch.bmm(probs, value.to(dt).reshape(b * kv, s, d))  # (B*KV, g*T, D)
    return out.view(b, h, t, d).transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, bf16_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return True


def _attention_bytes(config, micro: int, seq_len: int) -> int:
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    layers = int(getattr(config, "num_hidden_layers", 1) or 1)
    return 2 * 2 * micro * heads * seq_len * seq_len * layers  # scores and probabilities, bf16


@contextlib.contextmanager
def attention_as_gemms(model: nn.Module, micro: int, seq_len: int):
    """`bf16_attention` for every layer of `model` (a causal LM or a PEFT wrapper) for the block when its
    stored scores fit `ATTENTION_BYTES` and the model uses SDPA or eager attention; yields whether it did."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = getattr(base, "config", None)
    before = getattr(config, "_attn_implementation", None)
    use = (
        before in ("sdpa", "eager")
        and _attention_bytes(config, micro, seq_len) <= ATTENTION_BYTES
        and _register_attention()
    )
    found = (getattr(m, "config", None) for m in base.modules())
    configs = list({id(c): c for c in found if getattr(c, "_attn_implementation", None) == before}.values())
    try:
        if use:
            for c in configs:
                c._attn_implementation = ATTENTION_NAME
        yield use
    finally:
        if use:
            for c in configs:
                c._attn_implementation = before


# -- the heap --------------------------------------------------------------------------------------
def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def kept_heap():
    """glibc: buffers up to `MMAP_THRESHOLD` from the heap and no trimming for the block; trimming back
    to glibc's default afterwards and the heap trimmed once. Yields whether it applied (glibc found)."""
    libc = _libc()
    ok = bool(libc) and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    try:
        yield ok
    finally:
        if ok:
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
            libc.malloc_trim(0)


# -- all of it -------------------------------------------------------------------------------------
@contextlib.contextmanager
def fast_training(peft_model: nn.Module, device: torch.device, amp, micro: int, seq_len: int):
    """The speed-ups that apply (CPU, bf16 autocast) for the block; yields what was applied, in words."""
    applied: list[str] = []
    if torch.device(device).type != "cpu" or amp is not torch.bfloat16:
        yield applied
        return
    with contextlib.ExitStack() as stack:
        n = stack.enter_context(frozen_weights_in(peft_model, torch.bfloat16))
        if n:
            applied.append(f"{n} frozen linears stored in bf16")
        n = fast_dropout(peft_model)
        if n:
            applied.append(f"{n} dropouts on 16-bit lanes")
        if stack.enter_context(attention_as_gemms(peft_model, micro, seq_len)):
            applied.append("attention as bf16 GEMMs")
        if stack.enter_context(kept_heap()):
            applied.append("heap kept between steps")
        yield applied


def head_chunk(model: nn.Module, limit: int = 24 << 20) -> int:
    """Rows per head chunk in `pipeline.lora_loss` so that a chunk's fp32 logits stay under `limit`
    bytes (below `MMAP_THRESHOLD`: kept in the heap), between 32 and the default 512."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    vocab = int(getattr(getattr(base, "config", None), "vocab_size", 0) or 0)
    if vocab <= 0:
        return 512
    return max(32, min(512, limit // (4 * vocab)))
