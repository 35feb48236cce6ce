"""The sensitivity table and its file: one JSON per (model digest, choice set, windows, method, format).

The file is rewritten atomically (`pipeline.atomic`) after every measured entry, so a kill -9 loses
at most the entry in progress and a rerun computes only the missing ones. A file that does not parse,
is for another key, holds numbers that are not finite, or is a symbolic link is refused with one
line (`log`) and the table is measured again; nothing in it is trusted beyond its numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from frankenlab.pipeline.atomic import UnsafeOutputPath, atomic_write_text, guarded_path
from frankenlab.pipeline.planner.options import SKIP, UNCHANGED, OptionError, choice_set, parse_option

FORMAT = "frankenlab-sensitivities"
VERSION = 2  # 2: separate calibration windows, an optional reference option ("around")
MAX_FILE_BYTES = 16 * 2**20  # a table of 100 layers x 50 options is ~0.5 MiB


class CacheRefused(ValueError):
    """A cache file that is not a table for this key (the message says why)."""


@dataclass
class SensitivityTable:
    """Per (layer, option): mean NLL with only that layer changed minus the baseline mean NLL (nats/token).

    `deltas[layer][option]` holds measured entries; "none/16" is 0 by definition and never stored.
    `seconds[layer][option]` is the time each entry took; `baseline_seconds` the cached baseline pass.
    """

    model_digest: str
    n_layers: int
    patterns: tuple[str, ...]
    bits: tuple[int, ...]
    group_size: int
    method: str
    sym: bool
    windows: str  # e.g. "c4 8x256 seed 0 (calibration)"
    tokens: int  # tokens scored per entry
    skip: bool = True
    around: str | None = None  # the reference option of every layer (None: the unmodified model)
    calibration: str = ""  # the windows the pruning and quantization statistics come from
    baseline_nll: float = math.nan
    reference_nll: float = math.nan  # with `around`: every layer at that option
    deltas: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: dict[int, dict[str, float]] = field(default_factory=dict)
    baseline_seconds: float = 0.0

    # -- the search's view -------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return self.n_layers

    @property
    def options(self) -> list[str]:
        return choice_set(self.patterns, self.bits, skip=self.skip)

    @property
    def zero_option(self) -> str:
        """The option whose delta is 0 by definition: the reference's ("none/16" without `around`)."""
        return self.around or UNCHANGED

    @property
    def offset(self) -> float:
        """The reference's NLL minus the unmodified model's (0 without `around`)."""
        return 0.0 if self.around is None else self.reference_nll - self.baseline_nll

    def delta(self, layer: int, option: str) -> float:
        """Delta log-perplexity of `option` at `layer` from the reference (0.0 for the reference's own
        option); KeyError if not measured."""
        name = parse_option(option).name
        if name == self.zero_option and 0 <= layer < self.n_layers:
            return 0.0
        try:
            return self.deltas[layer][name]
        except KeyError:
            raise KeyError(f"no sensitivity measured for layer {layer}, option {name}") from None

    def has(self, layer: int, option: str) -> bool:
        return option == self.zero_option or option in self.deltas.get(layer, {})

    def measured_options(self) -> list[str]:
        """The options that are measured (every one but the reference's own)."""
        return [o for o in self.options if o != self.zero_option]

    def missing(self) -> list[tuple[int, str]]:
        return [(li, o) for li in range(self.n_layers) for o in self.measured_options() if not self.has(li, o)]

    @property
    def complete(self) -> bool:
        return not self.missing()

    @property
    def total_seconds(self) -> float:
        return self.baseline_seconds + sum(s for row in self.seconds.values() for s in row.values())

    def put(self, layer: int, option: str, delta: float, seconds: float) -> None:
        self.deltas.setdefault(layer, {})[option] = float(delta)
        self.seconds.setdefault(layer, {})[option] = float(seconds)

    # -- identity and files ------------------------------------------------------------------------
    def key(self) -> dict:
        """What the numbers depend on (the cache key)."""
        return {
            "model_digest": self.model_digest,
            "patterns": list(self.patterns),
            "bits": list(self.bits),
            "skip": self.skip,
            "group_size": self.group_size,
            "method": self.method,
            "sym": self.sym,
            "windows": self.windows,
            "calibration": self.calibration,
            "around": self.around,
        }

    def key_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "key": self.key(),
            "n_layers": self.n_layers,
            "tokens": self.tokens,
            "baseline_nll": self.baseline_nll,
            "baseline_seconds": self.baseline_seconds,
            "reference_nll": None if math.isnan(self.reference_nll) else self.reference_nll,
            "deltas": {str(li): dict(row) for li, row in sorted(self.deltas.items())},
            "seconds": {str(li): dict(row) for li, row in sorted(self.seconds.items())},
        }

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityTable:
        """The table `to_dict` wrote; CacheRefused (one line) for anything else."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CacheRefused("not a sensitivity table")
        if data.get("version") != VERSION:
            raise CacheRefused(f"table version {data.get('version')!r}, this frankenlab reads {VERSION}")
        try:
            key = data["key"]
            table = cls(
                model_digest=str(key["model_digest"]),
                n_layers=_int(data["n_layers"], 1),
                patterns=tuple(str(p) for p in key["patterns"]),
                bits=tuple(int(b) for b in key["bits"]),
                group_size=int(key["group_size"]),
                method=str(key["method"]),
                sym=bool(key["sym"]),
                windows=str(key["windows"]),
                tokens=_int(data["tokens"], 1),
                skip=bool(key["skip"]),
                around=None if key["around"] is None else parse_option(str(key["around"])).name,
                calibration=str(key["calibration"]),
                baseline_nll=_finite(data["baseline_nll"]),
                reference_nll=math.nan if data.get("reference_nll") is None else _finite(data["reference_nll"]),
                baseline_seconds=_finite(data.get("baseline_seconds", 0.0)),
            )
            if table.around is not None and table.around not in table.options:
                raise CacheRefused(f"its reference option {table.around!r} is not in the choice set")
            allowed = set(table.measured_options())
            for name, target in (("deltas", table.deltas), ("seconds", table.seconds)):
                rows = data[name]
                if not isinstance(rows, dict):
                    raise CacheRefused(f"{name} is not a table")
                for li, row in rows.items():
                    layer = _int(li, 0)
                    if layer >= table.n_layers or not isinstance(row, dict):
                        raise CacheRefused(f"{name}: layer {li!r} is not one of the model's {table.n_layers}")
                    for opt, value in row.items():
                        if opt not in allowed:
                            raise CacheRefused(f"{name}: option {opt!r} is not in the choice set")
                        target.setdefault(layer, {})[opt] = _finite(value)
        except CacheRefused:
            raise
        except (KeyError, TypeError, ValueError, OptionError) as exc:
            raise CacheRefused(f"malformed table ({type(exc).__name__}: {exc})") from None
        if set(table.seconds) != set(table.deltas) or any(
            set(table.seconds[li]) != set(row) for li, row in table.deltas.items()
        ):
            raise CacheRefused("deltas and seconds do not name the same entries")
        return table


def _int(value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise CacheRefused(f"{value!r} is not an integer")
    try:
        out = int(value)
    except ValueError:
        raise CacheRefused(f"{value!r} is not an integer") from None
    if out < low:
        raise CacheRefused(f"{value!r} is below {low}")
    return out


def _finite(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CacheRefused(f"{value!r} is not a finite number")
    return float(value)


def table_path(folder: Path, table: SensitivityTable) -> Path:
    """<folder>/sensitivity/<digest>-<key hash>.json (the digest's first 16 hex digits)."""
    digest = "".join(c for c in table.model_digest if c.isalnum())[:16] or "model"
    return guarded_path(Path(folder), "sensitivity", f"{digest}-{table.key_hash()}.json")


def read_table(path: Path, expected: SensitivityTable, *, shape: bool = True) -> SensitivityTable:
    """The stored table at `path` for `expected`'s key (and, with `shape`, its layers and tokens);
    CacheRefused (one line) when it is not."""
    if path.is_symlink():
        raise CacheRefused("it is a symbolic link")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise CacheRefused(f"it is larger than {MAX_FILE_BYTES // 2**20} MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CacheRefused(f"it does not read as JSON ({type(exc).__name__})") from None
    table = SensitivityTable.from_dict(data)
    if table.key() != expected.key():
        raise CacheRefused("it was measured for another model, choice set, windows or method")
    if shape and (table.n_layers, table.tokens) != (
        expected.n_layers or table.n_layers,
        expected.tokens or table.tokens,
    ):
        raise CacheRefused(
            f"it has {table.n_layers} layers x {table.tokens} tokens, not {expected.n_layers} x {expected.tokens}"
        )
    return table


def write_table(path: Path, table: SensitivityTable) -> None:
    """Atomically replace `path` with `table` (UnsafeOutputPath for a link, OSError for a disk problem)."""
    atomic_write_text(path, json.dumps(table.to_dict(), indent=1, sort_keys=True) + "\n")


__all__ = [
    "SKIP",
    "CacheRefused",
    "SensitivityTable",
    "UnsafeOutputPath",
    "read_table",
    "table_path",
    "write_table",
]
