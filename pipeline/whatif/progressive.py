"""A first answer from part of the what-if slice: the estimate, its coverage and its standard error.

The slice's first `coarse_rows` samples are computed first (their own batch), the rest after;
while only the first part is done, the plan's perplexity on the whole slice is estimated from the
part with the unmodified model as a control variate: the baseline's NLL on the whole slice is
known, so only the plan-minus-baseline difference is extrapolated,

    mean NLL(plan) ~= mean NLL(baseline, whole slice) + mean [NLL(plan) - NLL(baseline)] (part)

which cancels most of what makes one window easier than another. The uncertainty is the standard
error of that mean difference by batch means (the part's scored tokens in consecutive blocks;
nearby tokens are correlated, blocks much less), carried to perplexity by the delta method
(SE(ppl) ~= ppl * SE(mean NLL)). It describes the spread within the part, not every way the rest
of the slice could differ. Once every part is done the estimate is the exact slice perplexity
(the same number as a single full pass, up to float summation order) and carries no error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SE_BLOCKS = 16  # at most this many blocks for the batch-means standard error
SE_MIN_BLOCK = 8  # tokens per block at least


def batch_means_se(values: torch.Tensor) -> float:
    """Standard error of the mean of `values` (n,) from the means of consecutive blocks (nan below 2 blocks)."""
    n = values.numel()
    k = min(SE_BLOCKS, n // SE_MIN_BLOCK)
    if k < 2:
        return math.nan
    means = torch.stack([b.double().mean() for b in values.double().tensor_split(k)])  # (k,)
    return float(means.std(unbiased=True) / math.sqrt(k))


def partial_ppl(
    plan_nll: torch.Tensor, base_nll: torch.Tensor, base_total: float, total_tokens: int
) -> tuple[float, float]:
    """(estimated slice perplexity, its standard error) from the part's per-token NLLs of plan and baseline.

    plan_nll, base_nll: (n,) per-token NLL on the same scored tokens of the part (row-major);
    base_total: the baseline's summed NLL over the whole slice of `total_tokens` tokens.
    """
    diff = plan_nll.double() - base_nll.double()  # (n,)
    mean = base_total / total_tokens + float(diff.mean())
    ppl = math.exp(mean)
    return ppl, ppl * batch_means_se(diff)


def coverage_text(tokens: int, total_tokens: int, rows: int, total_rows: int) -> str:
    """ "1/4 of the slice (255/1020 tokens)" or "full slice (1020 tokens)"."""
    if tokens >= total_tokens:
        return f"full slice ({total_tokens} tokens)"
    return f"{rows}/{total_rows} of the slice ({tokens}/{total_tokens} tokens)"


@dataclass(frozen=True)
class Estimate:
    """Perplexity of one plan on the estimator's slice, and what it took."""

    ppl: float
    delta: float  # ppl - baseline ppl (positive = worse than the unmodified model)
    seconds: float
    restarted_at: int  # plan position computation restarted from (len(plan) = answered from memo)
    plan_text: str
    cached: bool  # reused cached states (False: naive full recompute)
    protocol: str = ""  # e.g. "wikitext2-concat-256:first4"; print it next to the number
    layers_run: int = 0  # decoder layers actually computed for this answer
    tokens: int = 0  # scored tokens the number rests on (0: not recorded, taken as the whole slice)
    total_tokens: int = 0  # scored tokens in the whole slice
    rows: int = 0  # samples of the slice computed
    total_rows: int = 0
    stderr: float | None = None  # standard error of ppl (and delta) for a partial estimate; None = exact

    @property
    def final(self) -> bool:
        """The exact slice perplexity (every sample computed), not a first answer from part of it."""
        return self.tokens >= self.total_tokens

    @property
    def coverage(self) -> float:
        """Share of the slice's scored tokens the number rests on (1.0 = exact)."""
        return self.tokens / self.total_tokens if self.total_tokens else 1.0

    @property
    def coverage_text(self) -> str:
        return coverage_text(self.tokens, self.total_tokens, self.rows, self.total_rows)

    @property
    def baseline(self) -> float:
        return self.ppl - self.delta

    @property
    def relative(self) -> float:
        """Delta as a fraction of the baseline perplexity (0.1 = 10 % worse)."""
        return self.delta / self.baseline if self.baseline else math.inf
