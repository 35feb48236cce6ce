"""One decoder layer pruned (WANDA N:M) and quantized (RTN or GPTQ) on its own, as the stages would.

Statistics come from one forward pass of the unmodified layer on its cached input (all calibration
windows): for every projection, the per-feature square sums of its input (WANDA's ||X_j||^2) and,
for GPTQ, X^T X. Then, for every option of the layer:

- WANDA: scores |W_ij| * ||X_j||_2 and keeps the N:M mask (`stages.width` pure functions), with the
  activation norms of the layer's cached inputs (the WANDA reference code's "layer" statistics);
- quantization in the GPTQ stage's format: `bits`, `group_size` (groups along the input, -1 = one
  per row), symmetric by default (the stage's `sym = True`), the GPTQ quantizer's scale and zero
  point; `rtn` rounds every weight to nearest, `gptq` runs GPTQ (Frantar et al. 2022: columns in
  order, the rounding error spread with the inverse Hessian of H = X^T X, dampened by 5 % of its mean
  diagonal, group parameters taken as each group is reached) with the pruned weights held at zero
  (masked GPTQ, as `pipeline.quant_mask` does for the stage). Both keep every pruned weight exactly 0.
  The stage's gptqmodel orders columns by activation groups (act_group_aware) and feeds each module
  the outputs of the modules quantized before it; this one keeps the natural order and the unmodified
  layer's inputs, so a layer's GPTQ loss here is close to, not equal to, the stage's.

GPTQ treats the rows of a weight independently given H, so every quantized option of a projection
(each pattern x each bit width) is one GPTQ run over the options' weights stacked row-wise, with a
bit width per row: one column loop per projection instead of one per option (12x fewer small
operations with the default choice set).

The weights are replaced (`.data` rebound, never written in place) and `edited` gives the original
tensors back on the way out, so the model is unchanged afterwards, even on a cancel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from frankenlab.pipeline.layerwise import layer_hidden, linear_modules
from frankenlab.pipeline.planner.options import FLOAT_BITS, Option
from frankenlab.pipeline.stages.width import ALL_PROJECTIONS, nm_prune_mask, wanda_scores

METHODS = ("gptq", "rtn")
DAMP_PERCENT = 0.05  # the GPTQ stage's default
BLOCK = 128  # GPTQ's lazy-batch block of columns

Bits = int | torch.Tensor  # one bit width, or one per row (rows,)


def _maxq(bits: Bits, like: torch.Tensor) -> torch.Tensor:
    return (2 ** torch.as_tensor(bits, device=like.device, dtype=like.dtype) - 1).expand(like.shape[0])


def quant_params(x: torch.Tensor, bits: Bits, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of x (rows, cols): the GPTQ quantizer's (gptqmodel's `find_params`)."""
    maxq = _maxq(bits, x)
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both, -1.0, xmin)
    xmax = torch.where(both, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = (maxq + 1) / 2 if sym else torch.round(-xmin / scale)
    return scale, zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: Bits) -> torch.Tensor:
    """x (rows, cols) rounded to its codes and back: scale * (clamp(round(x / scale) + zero) - zero)."""
    s, z = scale.unsqueeze(1), zero.unsqueeze(1)
    q = torch.minimum(torch.clamp(torch.round(x / s) + z, min=0), _maxq(bits, x).unsqueeze(1))
    return s * (q - z)


def _group(cols: int, group_size: int) -> int:
    return cols if group_size in (-1, 0) or group_size >= cols else group_size


def rtn(w: torch.Tensor, *, bits: Bits, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest of w (out, in) in groups of `group_size` inputs; zeros stay exactly zero."""
    out = torch.empty_like(w)
    g = _group(w.shape[1], group_size)
    for a in range(0, w.shape[1], g):
        scale, zero = quant_params(w[:, a : a + g], bits, sym)
        out[:, a : a + g] = fake_quant(w[:, a : a + g], scale, zero, bits)
    return out


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    bits: Bits,
    group_size: int,
    sym: bool,
    damp_percent: float = DAMP_PERCENT,
    keep_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPTQ of w (rows, in) float32 with Hessian h = X^T X (in, in); `bits` one width or one per row;
    `keep_zero` (rows, in) bool holds those weights at exactly 0 (their error is 0, so nothing of them
    propagates). Returns the dequantized weight."""
    w = w.clone()
    h = h.clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp_percent * torch.mean(torch.diag(h)))
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # not positive definite even dampened: rounding alone
        return rtn(w if keep_zero is None else w.masked_fill(keep_zero, 0), bits=bits, group_size=group_size, sym=sym)
    keep = None if keep_zero is None else (~keep_zero).to(w.dtype)
    if keep is not None:
        w.mul_(keep)
    g = _group(cols, group_size)
    maxq = _maxq(bits, w).unsqueeze(1)
    q = torch.empty_like(w)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # the group's parameters from its columns as they stand now
                group = torch.cat([w1[:, i:], w[:, i2 : col + g]], dim=1)[:, :g]
                if keep is not None:
                    group = group * keep[:, col : col + group.shape[1]]
                scale, zero = quant_params(group, bits, sym)
                s, z, inv_s = scale.unsqueeze(1), zero.unsqueeze(1), (1 / scale).unsqueeze(1)
            x = w1[:, i : i + 1]
            if keep is not None:
                x = x * keep[:, col : col + 1]
            qx = (torch.minimum(torch.clamp(torch.round(x * inv_s) + z, min=0), maxq) - z) * s
            q[:, col : col + 1] = qx
            err = (x - qx) / hinv1[i, i]
            w1[:, i:].sub_(err * hinv1[i, i:].unsqueeze(0))
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q


@torch.no_grad()
def layer_stats(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, need_h: bool) -> dict[str, tuple]:
    """Per projection of the unmodified layer run on `hidden`: (input square sums, X^T X or None), float32."""
    linears = linear_modules(layer, ALL_PROJECTIONS)
    stats: dict[str, tuple] = {}
    last: list = [None, None]  # q, k, v (and gate, up) share one input tensor: one reduction

    def hook(name):
        def pre(_mod, args):
            x = args[0]
            if last[0] is not x:
                flat = x.reshape(-1, x.shape[-1]).float()
                last[0], last[1] = x, (flat.square().sum(dim=0), flat.T @ flat if need_h else None)
            stats[name] = last[1]

        return pre

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        layer(hidden, use_cache=False, **kwargs)
    finally:
        for hd in handles:
            hd.remove()
        last.clear()
    return stats


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside (process-wide, restored after). GPTQ's column loop is thousands of
    small operations: on 2 shared cores at load ~18, one stacked GPTQ of a 6912 x 576 weight took
    0.38 CPU s (2.0 s wall) on one thread and 8.9 CPU s (38 s wall) on two, the threads waiting for
    each other on every operation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def option_weights(
    layer: nn.Module,
    stats: dict[str, tuple],
    options: list[Option],
    *,
    group_size: int,
    sym: bool,
    method: str,
    damp_percent: float = DAMP_PERCENT,
    check: Callable[[], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """{option name: {projection: its weight under that option}} for the (non-skip) `options`, every
    quantized option of a projection in one stacked GPTQ (or RTN) run. `check()` runs between projections."""
    out: dict[str, dict[str, torch.Tensor]] = {o.name: {} for o in options}
    for name, lin in linear_modules(layer, ALL_PROJECTIONS).items():
        if check is not None:
            check()
        w = lin.weight.detach().float()
        sq, h = stats[name]
        pruned = {}
        for nm in dict.fromkeys(o.nm for o in options):
            pruned[nm] = w if nm is None else w * nm_prune_mask(wanda_scores(w, sq), *nm)
        quantized = [o for o in options if o.bits != FLOAT_BITS]
        for o in options:
            if o.bits == FLOAT_BITS:
                out[o.name][name] = pruned[o.nm].to(lin.weight.dtype)
        if not quantized:
            continue
        rows = w.shape[0]
        stack = torch.cat([pruned[o.nm] for o in quantized])
        bits = torch.tensor([o.bits for o in quantized], dtype=w.dtype).repeat_interleave(rows)
        if method == "rtn":
            q = rtn(stack, bits=bits, group_size=group_size, sym=sym)
        else:
            keep_zero = torch.cat(
                [pruned[o.nm] == 0 if o.nm is not None else torch.zeros_like(w, dtype=torch.bool) for o in quantized]
            )
            with one_thread():
                q = gptq(
                    stack, h, bits=bits, group_size=group_size, sym=sym, damp_percent=damp_percent, keep_zero=keep_zero
                )
        for k, o in enumerate(quantized):
            out[o.name][name] = q[k * rows : (k + 1) * rows].to(lin.weight.dtype)
    return out


@contextlib.contextmanager
def edited(layer: nn.Module) -> Iterator[dict[str, nn.Linear]]:
    """The layer's projections; every weight rebound inside is given its original tensor back on exit."""
    linears = linear_modules(layer, ALL_PROJECTIONS)
    originals = {name: lin.weight.data for name, lin in linears.items()}
    try:
        yield linears
    finally:
        for name, lin in linears.items():
            lin.weight.data = originals[name]


@torch.no_grad()
def run_with(layer: nn.Module, weights: dict[str, torch.Tensor], hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The output of `layer` on `hidden` with its projections' weights replaced by `weights` (then restored)."""
    with edited(layer) as linears:
        for name, w in weights.items():
            linears[name].weight.data = w
        return layer_hidden(layer(hidden, use_cache=False, **kwargs))
