"""How sure is an accuracy? The Wilson score interval, printed beside every accuracy.

With a few hundred questions and accuracies near 10 %, one standard error is about two points, so
most differences between configurations are noise. The Wilson interval (Wilson 1927) is the one
lm-evaluation-harness' users and statsmodels' `proportion_confint(method="wilson")` reach for: unlike
the normal approximation it stays inside [0, 1] and is honest at 0 of n and n of n.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The (low, high) Wilson score interval of the proportion correct / n (95 % by default)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"{correct} correct out of {n} is not a proportion")
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if correct == 0 else lo), (1.0 if correct == n else hi)  # exact ends, not 0.9999999


def accuracy_fields(correct: int, n: int) -> dict:
    """What every accuracy metric carries: the count, the question count and its 95 % interval."""
    lo, hi = wilson(correct, n)
    return {"correct": correct, "n": n, "ci95": [lo, hi]}


def format_accuracy(value: float, n: int | None, ci: list | tuple | None = None) -> str:
    """'9.5 % (19/200, 95 % CI 6.2-14.4 %)': the number, how many questions, how sure."""
    if n is None:
        return f"{100 * value:.1f} %"
    correct = round(value * n)
    lo, hi = ci if ci else wilson(correct, n)
    return f"{100 * value:.1f} % ({correct}/{n}, 95 % CI {100 * lo:.1f}-{100 * hi:.1f} %)"
