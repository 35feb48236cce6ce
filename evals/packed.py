"""Linear layers on weights reordered once for oneDNN's GEMM (CPU, float32, inference only).

On CPUs torch's `F.linear` runs fp32 through MKL's sgemm, which repacks the weight into its blocked
layout on every call. oneDNN can take the weight already reordered (`mkldnn._reorder_linear_weight`,
the same ops torch.compile's CPU freezing path uses) and then spends its time in the GEMM itself.
Measured on this project's 2-core AMD EPYC (AVX2), fp32 GFLOP per CPU-second at 2048 rows, the
bundled model's shapes (576x576, 576x192, 576x1536, 1536x576, and 4096-row head blocks): F.linear
66-83, reordered oneDNN 93-102. Results agree to float rounding (relative NLL difference ~1e-10 on
a 4 x 512 batch of the bundled model).

`Packs` holds the reordered weights for as long as an evaluation runs; `packed_linears(model)`
routes every `nn.Linear` of a model through it for the duration of a `with` block (a LLaMA MLP as
one fused call: SiLU and the gate product in the GEMM epilogues), and
`Packs.linear` serves callers that slice a weight themselves (the output head in vocabulary
blocks). Anything else (GPU, float16/bfloat16, autograd, a build without oneDNN, an op that
refuses) is plain `F.linear`. The reordered copies cost one more copy of the weights while the
block runs (the bundled model: ~0.5 GB), freed when it ends, and are not made when they would take
more than half the memory still available. `FRANKENLAB_PACKED_LINEAR=0` turns it off.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
import torch.nn.functional as F
from torch import nn

from frankenlab.evals import switched_off
from frankenlab.evals.devices import cpu_fast_paths


def available() -> bool:
    if switched_off("FRANKENLAB_PACKED_LINEAR"):
        return False
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class Packs:
    """Reordered fp32 weights, keyed by storage, shape and version (an in-place edit repacks)."""

    def __init__(self) -> None:
        self.enabled = available()
        self._packs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _usable_input(self, x: torch.Tensor) -> bool:
        return (
            self.enabled
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.numel() > 0
            and not (torch.is_grad_enabled() and x.requires_grad)
        )

    @staticmethod
    def _usable_weight(weight: torch.Tensor) -> bool:
        return (
            weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and weight.dim() == 2
            and not (torch.is_grad_enabled() and weight.requires_grad)
        )

    def _usable(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return self._usable_input(x) and self._usable_weight(weight) and x.shape[-1] == weight.shape[1]

    def _pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        # inference tensors keep no version counter (and cannot be edited outside inference mode)
        version = -1 if weight.is_inference() else weight._version
        key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), version)
        with self._lock:
            hit = self._packs.get(key)
        if hit is not None:
            return hit[0]
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        except (RuntimeError, TypeError):
            self.enabled = False  # this build or this weight refuses: plain F.linear from now on
            return None
        with self._lock:  # the weight is held with its pack: its address cannot be reused by another
            self._packs[key] = (packed, weight)
        return packed

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self._usable(x, weight) or (bias is not None and bias.dtype != torch.float32):
            return F.linear(x, weight, bias)
        packed = self._pack(weight)
        if packed is None:
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        try:
            out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
        except (RuntimeError, TypeError):
            self.enabled = False
            return F.linear(x, weight, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def gated_mlp(self, x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor | None:
        """down(silu(gate(x)) * up(x)) with the SiLU and the product fused into the GEMMs' epilogues
        (oneDNN post-ops "swish" and binary "mul"): two passes over a (rows, intermediate) tensor
        fewer, 12-20 % of an MLP's time on the bundled model's shapes. None when it cannot run."""
        weights = (gate.weight, up.weight, down.weight)
        if not (
            self._usable(x, gate.weight)
            and self._usable(x, up.weight)
            and self._usable_weight(down.weight)
            and down.weight.shape[1] == gate.weight.shape[0] == up.weight.shape[0]
        ):
            return None
        if any(b is not None and b.dtype != torch.float32 for b in (gate.bias, up.bias, down.bias)):
            return None
        packed = [self._pack(w) for w in weights]
        if any(p is None for p in packed):
            return None
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        try:
            g = torch.ops.mkldnn._linear_pointwise(rows, packed[0], gate.bias, "swish", [], "")
            h = torch.ops.mkldnn._linear_pointwise.binary(rows, g, packed[1], up.bias, "mul")
            out = torch.ops.mkldnn._linear_pointwise(h, packed[2], down.bias, "none", [], "")
        except (RuntimeError, TypeError):
            return None
        return out.reshape(*x.shape[:-1], down.weight.shape[0])

    def clear(self) -> None:
        with self._lock:
            self._packs.clear()


def available_memory() -> int | None:
    """Bytes of memory the system can still hand out (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _packed_forward(packs: Packs, original):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not packs.enabled:
            return original(x)
        return packs.linear(x, self.weight, self.bias)

    return forward


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _fusable_mlp(module: nn.Module) -> bool:
    """A LLaMA MLP, down(act(gate(x)) * up(x)), of plain linears with SiLU and no hooks to honour."""
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return (
        all(type(p) is nn.Linear for p in parts)
        and _is_silu(getattr(module, "act_fn", None))
        and type(module).__name__.endswith("MLP")
        and "forward" not in module.__dict__
        and not any(p._forward_hooks or p._forward_pre_hooks for p in parts)
    )


def _mlp_forward(packs: Packs, original):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if packs.enabled and not any(
            p._forward_hooks or p._forward_pre_hooks for p in (self.gate_proj, self.up_proj, self.down_proj)
        ):
            out = packs.gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj)
            if out is not None:
                return out
        return original(x)

    return forward


@contextlib.contextmanager
def packed_linears(model: nn.Module, packs: Packs | None = None):
    """Every plain `nn.Linear` of `model` computes through `packs` inside the block (see the module
    docstring); yields the Packs (for callers that also slice weights, such as the blocked head).
    Modules whose forward is already replaced on the instance are left alone (nested blocks, other
    wrappers), and an MLP whose linears carry hooks runs them one by one, hooks included; the model
    is as before when the block ends, even on an exception."""
    packs = packs if packs is not None else Packs()
    patched: list[nn.Module] = []
    if packs.enabled and not cpu_fast_paths(model):  # a GPU model's linears stay as they are
        packs.enabled = False
    if packs.enabled:
        need = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)
        room = available_memory()
        if room is not None and need > room // 2:  # the copies must not push the machine into swap or OOM
            packs.enabled = False
    if packs.enabled:
        for module in model.modules():
            if _fusable_mlp(module):
                module.forward = types.MethodType(_mlp_forward(packs, module.forward), module)
                patched.append(module)
            elif type(module) is nn.Linear and "forward" not in module.__dict__:
                module.forward = types.MethodType(_packed_forward(packs, module.forward), module)
                patched.append(module)
    try:
        yield packs
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
        packs.clear()
