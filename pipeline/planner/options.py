"""What one decoder layer may become: "skip", or an N:M pattern x bits pair named "<pattern>/<bits>".

`pattern` is "none" (dense) or a structured N:M pattern in thesis notation (N of every M consecutive
weights of each row pruned, "2:4" removes 50 %); `bits` is 16 (the float weights as they are) or a
GPTQ bit width (`pipeline.quant.QUANT_BITS`). "none/16" is the layer unchanged: its delta is 0 by
definition and it is never measured. Examples: "skip", "none/16", "1:8/16", "2:4/4", "none/3".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

SKIP = "skip"
DENSE = "none"
FLOAT_BITS = 16
UNCHANGED = f"{DENSE}/{FLOAT_BITS}"
DEFAULT_PATTERNS = (DENSE, "1:8", "1:4", "2:4", "8:16")
DEFAULT_BITS = (16, 8, 4, 3)
QUANT_BITS = (2, 3, 4, 8)  # the GPTQ stage's (pipeline.quant.QUANT_BITS), without importing gptqmodel's wrapper
# Bit widths whose stored form keeps an N:M pattern (pipeline.weight_bytes' `_CODE_PATTERN_BITS`, plus
# floats): 3-bit codes over a pattern are stored dense, so an N:M option at 3 bits costs what the
# dense one does and can only lose quality; the choice set leaves it out (nothing measures it).
PATTERN_BITS = (FLOAT_BITS, 2, 4, 8)

_NM = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


class OptionError(ValueError):
    """A choice that is not an option; the message says what the accepted forms are."""


class Option(NamedTuple):
    """One option: `pattern` ("skip", "none" or "N:M") and `bits` (0 for skip, 16 = float)."""

    pattern: str
    bits: int

    @property
    def skip(self) -> bool:
        return self.pattern == SKIP

    @property
    def name(self) -> str:
        return SKIP if self.skip else option_name(self.pattern, self.bits)

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of the pattern, None for dense or skip."""
        if self.pattern in (SKIP, DENSE):
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def quantized(self) -> bool:
        return not self.skip and self.bits != FLOAT_BITS

    @property
    def unchanged(self) -> bool:
        return self.pattern == DENSE and self.bits == FLOAT_BITS


def normalize_pattern(pattern: str) -> str:
    """ "none"/"dense" or "N:M" with 1 <= N < M, spaces removed; OptionError otherwise."""
    text = str(pattern).strip().lower()
    if text in (DENSE, "dense", ""):
        return DENSE
    match = _NM.fullmatch(text)
    if match is None:
        raise OptionError(f"pattern {pattern!r} is neither 'none' nor N:M (e.g. 2:4, 1:8)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise OptionError(f"pattern {pattern!r}: N:M needs 1 <= N < M (N of every M weights pruned)")
    return f"{n}:{m}"


def normalize_bits(bits) -> int:
    try:
        value = int(str(bits).strip())
    except ValueError:
        value = None
    if value != FLOAT_BITS and value not in QUANT_BITS:
        raise OptionError(f"bits {bits!r}: choose {FLOAT_BITS} (float, unquantized) or one of {QUANT_BITS}")
    return value


def option_name(pattern: str, bits: int) -> str:
    """ "2:4/4" from ("2:4", 4); the pattern and bits are checked and normalized."""
    return f"{normalize_pattern(pattern)}/{normalize_bits(bits)}"


def parse_option(name: str) -> Option:
    """Option("skip", 0) for "skip", else Option(pattern, bits) from "<pattern>/<bits>" ("2:4/4")."""
    text = str(name).strip().lower()
    if text == SKIP:
        return Option(SKIP, 0)
    pattern, sep, bits = text.partition("/")
    if not sep:
        raise OptionError(f"option {name!r} is neither 'skip' nor '<pattern>/<bits>' (e.g. 2:4/4, none/8)")
    return Option(normalize_pattern(pattern), normalize_bits(bits))


def choice_set(patterns: Iterable[str], bits: Iterable[int], *, skip: bool = True) -> list[str]:
    """Every option of one layer, in order: "skip" (if asked), then each pattern x each bits, except
    N:M patterns at bit widths that store them dense (`PATTERN_BITS`)."""
    pats = list(dict.fromkeys(normalize_pattern(p) for p in patterns))
    bs = list(dict.fromkeys(normalize_bits(b) for b in bits))
    if not pats or not bs:
        raise OptionError("the choice set needs at least one pattern and one bit width")
    names = [f"{p}/{b}" for p in pats for b in bs if p == DENSE or b in PATTERN_BITS]
    if not names:
        raise OptionError(
            f"N:M patterns at {', '.join(map(str, bs))} bits are stored dense (no bytes saved): "
            f"add pattern none or bits {', '.join(map(str, PATTERN_BITS))}"
        )
    return ([SKIP] if skip else []) + names


def valid_group_size(group_size: int) -> bool:
    """A GPTQ group size: -1 (one group per row) or a power of 2."""
    return group_size == -1 or (group_size > 0 and group_size & (group_size - 1) == 0)


def parse_choice_words(
    words: Iterable[str], usage: str, *, what: str = "choices", group: int | None = None
) -> tuple[tuple[str, ...], tuple[int, ...], int | None]:
    """("patterns=none,2:4", "bits=16,4") -> (patterns, bits, group size), checked and normalized; each word
    is optional (the defaults). With `group` (its default) a "group=128" word is taken too. A bad word is
    an OptionError "<what> <word>: <usage>" (one line)."""
    patterns, bits = list(DEFAULT_PATTERNS), list(DEFAULT_BITS)
    keys = ("patterns", "bits") + (("group",) if group is not None else ())
    for item in words:
        key, sep, value = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in value.split(",") if v.strip()]
        if not sep or key not in keys or not values:
            raise OptionError(f"{what} {item!r}: {usage}")
        if key == "patterns":
            patterns = values
        elif key == "bits":
            bits = values
        else:
            try:
                group = int(values[0])
            except ValueError:
                group = 0
            if len(values) != 1 or not valid_group_size(group):
                raise OptionError(f"{what} {item!r}: group is -1 (one group per row) or a power of 2 such as 128")
    try:
        options = choice_set(patterns, bits)
    except OptionError as exc:
        raise OptionError(f"{what}: {exc}") from None
    pats = tuple(dict.fromkeys(parse_option(o).pattern for o in options if o != SKIP))
    bs = tuple(dict.fromkeys(parse_option(o).bits for o in options if o != SKIP))
    return pats, bs, group
