"""Masked GPTQ: quantize a pruned model without refilling its zeros (a narrow patch of gptqmodel).

GPTQ quantizes one column at a time and spreads each column's rounding error over the columns
not yet quantized (`W[:, j:] -= err * Hinv[j, j:]`). A pruned weight then drifts away from zero
and gets a nonzero code: Width 2:4 went from density 0.5 to 0.5019. SparseGPT / sparseml keep the
pattern by masking the update (`W[:, j:] -= err * mask[:, j:]`). gptqmodel 7.x has no mask, and its
`GPTQ.quantize` is 500 lines we do not want to fork, so this module changes two calls inside it:

- `Quantizer.quantize(column)`: before the column is rounded, its pruned entries are set back to
  exactly zero *in place* (the column is a view of gptqmodel's working copy). Their rounding error
  is then 0, so nothing from them propagates; the updates they received from kept weights of the
  same row are discarded. Kept weights only ever receive error from kept weights of their own row
  (GPTQ's update of row r depends on row r's errors alone), so every kept weight ends exactly where
  the masked update `W[:, j:] -= err * mask[:, j:]` would leave it.
- `Quantizer.find_params(group)`: group scales and zero points are computed with the pruned
  entries at zero, as the masked algorithm sees them.

Columns arrive in gptqmodel's processing order, which is permuted under `desc_act` (by the Hessian
diagonal) or `act_group_aware` (gptqmodel's default, GAR). The permutation is recomputed with
gptqmodel's own functions from the Hessian it is about to use, and the mask is permuted alongside.
After the call, the returned weights are checked: every pruned weight must be exactly zero (the
codes then equal the group's zero point and dequantize to 0). Paths the patch does not see column
by column (gptqmodel's RTN fallback for starved modules, its mock-quantization NaN retry) get the
zeros set on their result, which is exact for round-to-nearest; they are counted in `stats()`.
Swapping the quantizer's class also keeps gptqmodel off its fused CUDA block kernel (it checks
`type(quantizer) is Quantizer`), which would bypass the per-column calls.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

_state = threading.local()
_lock = threading.Lock()
_active = 0
_stats = {"modules": 0, "masked_weights": 0, "fixed_after": 0}
_patched = False
_subclasses: dict[type, type] = {}


def stats() -> dict:
    """Counters since the last `masking()` began: modules masked, pruned weights, zeros set afterwards."""
    return dict(_stats)


@contextlib.contextmanager
def masking(enabled: bool = True):
    """While active, every gptqmodel GPTQ task keeps the exact zeros of the weight it quantizes."""
    global _active
    if not enabled:
        yield
        return
    _install()
    with _lock:
        if _active == 0:
            _stats.update(modules=0, masked_weights=0, fixed_after=0)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1


def _install() -> None:
    global _patched
    if _patched:
        return
    from gptqmodel.quantization import gptq as gq

    original = gq.GPTQ.quantize

    def quantize(self, blocksize=128):
        if not _active or getattr(self.quantizer, "_fl_mask", None) is not None:
            return original(self, blocksize=blocksize)  # off, or the NaN retry re-entering
        mask = _module_mask(self)
        if mask is None:
            return original(self, blocksize=blocksize)
        quantizer = self.quantizer
        base = type(quantizer)
        quantizer._fl_mask, quantizer._fl_task, quantizer._fl_col, quantizer._fl_perm_mask = mask, self, -1, None
        quantizer.__class__ = _masked_class(base)
        try:
            result = original(self, blocksize=blocksize)
        finally:
            quantizer.__class__ = base
            for attr in ("_fl_mask", "_fl_task", "_fl_col", "_fl_perm_mask"):
                quantizer.__dict__.pop(attr, None)
        q = result[0]
        keep_zero = mask[:, : q.shape[1]].to(q.device) if q.shape == mask[:, : q.shape[1]].shape else None
        if keep_zero is None:
            return result
        stray = int((q[keep_zero] != 0).sum())
        if stray:
            q.masked_fill_(keep_zero, 0)
        with _lock:
            _stats["modules"] += 1
            _stats["masked_weights"] += int(keep_zero.sum())
            _stats["fixed_after"] += stray
        return result

    gq.GPTQ.quantize = quantize
    gq.GPTQ._frankenlab_unmasked_quantize = original
    _patched = True


def _module_mask(task) -> torch.Tensor | None:
    """(rows, columns) bool: where the weight is exactly zero now, padded like gptqmodel pads."""
    module = task.module
    if not isinstance(module, nn.Linear):
        return None
    mask = module.weight.data == 0
    if not bool(mask.any()):
        return None
    pad = int(getattr(task, "_tp_pad_cols", 0) or 0)
    if pad:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], pad)], dim=1)
    return mask


def _processing_order(task, columns: int) -> torch.Tensor | None:
    """The column permutation gptqmodel's quantize is about to apply (None: natural order)."""
    from gptqmodel.quantization import gptq as gq

    qcfg = task.qcfg
    H = task.H
    if H is None or not (qcfg.desc_act or qcfg.act_group_aware):
        return None
    diag = torch.diag(H).clone()
    diag[diag == 0] = 1  # gptqmodel sets dead columns' diagonal to 1 before ordering
    if qcfg.desc_act:
        return torch.argsort(diag, descending=True)
    local_perms, local_values = gq.compute_local_perms(diag, qcfg.group_size, return_values=True)
    global_perm = gq.compute_global_perm(diag, qcfg.group_size, precomputed_values=local_values)
    final = gq.compose_final_perm(local_perms, global_perm, qcfg.group_size)
    return gq.extend_perm_with_tail(final, columns)


def _masked_class(base: type) -> type:
    cls = _subclasses.get(base)
    if cls is not None:
        return cls

    class MaskedQuantizer(base):  # type: ignore[misc, valid-type]
        def find_params(self, x, weight=False):
            mask = self._fl_mask
            if weight and x.dim() == 2 and self._fl_col < 0:
                # gptqmodel's first call: the whole weight, before ordering; the Hessian is final now.
                task = self._fl_task
                order = _processing_order(task, mask.shape[1])
                perm_mask = mask if order is None else mask[:, order.to(mask.device)]
                self._fl_perm_mask = perm_mask.to(x.device)
                self._fl_col = 0
                if x.shape == mask.shape:
                    x = x.masked_fill(mask.to(x.device), 0)
                return super().find_params(x, weight=weight)
            if weight and x.dim() == 2 and self._fl_perm_mask is not None:
                start = self._fl_col  # a group starts at the next column to be quantized
                part = self._fl_perm_mask[:, start : start + x.shape[1]]
                if part.shape == x.shape:
                    x = x.masked_fill(part, 0)
            return super().find_params(x, weight=weight)

        def quantize(self, x):
            perm_mask = self._fl_perm_mask
            if perm_mask is not None and x.dim() == 2 and x.shape[1] == 1 and 0 <= self._fl_col < perm_mask.shape[1]:
                x.masked_fill_(perm_mask[:, self._fl_col : self._fl_col + 1], 0)  # in place: its error becomes 0
                self._fl_col += 1
            return super().quantize(x)

    MaskedQuantizer.__name__ = f"Masked{base.__name__}"
    _subclasses[base] = MaskedQuantizer
    return MaskedQuantizer
