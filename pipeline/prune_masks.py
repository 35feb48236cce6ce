"""Width pruning's tensor math, pure functions of tensors: WANDA scores, N:M and unstructured keep-masks,
and the check that a weight holds an N:M pattern. The width stage (`pipeline/stages/width.py`) prunes
with them; the planner's per-layer edits and the tests use them too.
"""

from __future__ import annotations

import torch


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (out, in): in every group of m consecutive inputs of a row, drop the n lowest scores."""
    out_f, in_f = scores.shape
    groups = scores.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    drop = torch.topk(groups, n, dim=-1, largest=False).indices  # (out, in/m, n)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, drop, False)
    return keep.reshape(out_f, in_f)


def unstructured_prune_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask dropping the `ratio` lowest scores of each output row (WANDA's per-row comparison group)."""
    k = int(scores.shape[1] * ratio)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        drop = torch.topk(scores, k, dim=1, largest=False).indices
        keep.scatter_(1, drop, False)
    return keep


def wanda_scores(weight: torch.Tensor, act_sq_sum: torch.Tensor | None) -> torch.Tensor:
    """|W| * ||X_j||_2 (WANDA), or |W| alone when no activation norms are given (magnitude)."""
    w = weight.detach().abs().float()  # (out, in)
    if act_sq_sum is None:
        return w
    return w * act_sq_sum.float().sqrt().unsqueeze(0)  # (1, in) broadcast over rows


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs of every row holds at least n zeros."""
    out_f, in_f = weight.shape
    zeros = (weight.reshape(out_f, in_f // m, m) == 0).sum(-1)
    return bool((zeros >= n).all())
