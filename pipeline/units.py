"""Numbers as people read them; no torch here, so session tables can use it without loading a model stack."""

from __future__ import annotations


def fmt_bytes(n: float | None) -> str:
    """Binary units, as memory budgets are given (4 MiB, 11 GiB); "-" for an unknown size.

    Two decimals: against a 4 MiB budget, 4.04 MiB must not read as 4.0 MiB.
    """
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
