"""Per-layer sensitivities: the change in log-perplexity when only one decoder layer takes one option.

API (what the planner's search uses)::

    table = measure_sensitivities(model, tokenizer, patterns=("none", "1:8", "1:4", "2:4"),
                                  bits=(16, 8, 4, 3), group_size=128, windows=None, method="gptq",
                                  cache_dir=None, progress=None, cancel=None, log=None)
    table.delta(7, "2:4/4")   # mean NLL (nats/token) with layer 7 at 2:4 + 4-bit, minus the baseline's
    table.layers, table.options, table.baseline_nll, table.to_dict(), SensitivityTable.from_dict(d)
    load_cached(model_digest(model), n_layers=30, ...)   # the stored table, or None, without measuring

An option is "skip" (the layer removed: identity) or "<pattern>/<bits>" (`options`): WANDA N:M on
the layer's own inputs, then its quantization alone in the GPTQ stage's format (`layer_edit`:
`method` "gptq", the default, or "rtn"). "none/16" is the layer unchanged (delta 0, not measured).

How it is cheap: the calibration windows (`windows`: a `CalibrationConfig`, default C4 train
`DEFAULT_WINDOWS`, or a (windows, tokens) id tensor; evaluation text is refused) go through the
unmodified model once and the input of every layer is kept. An entry (l, o) starts from the cached
input of layer l, runs layer l edited (or nothing, for skip), then layers l+1.. and the final norm and
blocked head (`evals.head`): nothing before l is recomputed. Layers are measured in order and a
layer's cached input is freed when its options are done.

Stored per key (model digest, choice set, group size, symmetry, windows, method) under the project's
cache folder (`pipeline.loading.cache_dir()/sensitivity/`), rewritten atomically after every entry:
resumable (a rerun measures only what is missing; a kill -9 loses at most the entry in progress),
cancelable (`cancel()` is checked before every layer forward, every projection edit and every head
chunk: `evals.cancel.Cancelled` is raised, what is measured stays stored), with `progress(fraction,
"layer 7/30, option 2:4/4")`. A file that is not a table for this key is refused in one line (`log`)
and measured again.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from frankenlab.evals.cancel import Cancelled
from frankenlab.evals.errors import RecipeError
from frankenlab.evals.head import HEAD_CHUNK_TOKENS, head_token_nll
from frankenlab.pipeline.calibration import CalibrationConfig, calibration_ids
from frankenlab.pipeline.layerwise import capture_inputs, layer_hidden, linear_modules
from frankenlab.pipeline.loading import cache_dir as default_cache_dir
from frankenlab.pipeline.loading import decoder_layers
from frankenlab.pipeline.planner.layer_edit import DAMP_PERCENT, METHODS, layer_stats, option_weights, run_with
from frankenlab.pipeline.planner.options import (
    DEFAULT_BITS,
    DEFAULT_PATTERNS,
    SKIP,
    UNCHANGED,
    Option,
    OptionError,
    choice_set,
    option_name,
    parse_option,
)
from frankenlab.pipeline.planner.sensitivity_table import (
    CacheRefused,
    SensitivityTable,
    UnsafeOutputPath,
    read_table,
    table_path,
    write_table,
)
from frankenlab.pipeline.stages.width import ALL_PROJECTIONS

DEFAULT_METHOD = "gptq"
DEFAULT_GROUP_SIZE = 128
# 3 windows x 128 tokens of C4 train (the calibration's seq_len, 381 tokens scored): the default pass on
# the bundled model (30 layers x 16 measured options) is ~25 CPU minutes on 2 shared cores; 4 windows
# took ~30 (docs/benchmarks.md, "Sensitivities"). Pass more windows for steadier numbers.
DEFAULT_WINDOWS = CalibrationConfig(dataset="c4", samples=3, seq_len=128, seed=0)
CALIBRATION_SETS = ("c4", "wikitext2-train")  # named sets that are not evaluation data

ProgressFn = Callable[[float, str], None]

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_PATTERNS",
    "DEFAULT_WINDOWS",
    "METHODS",
    "SKIP",
    "UNCHANGED",
    "CacheRefused",
    "Option",
    "OptionError",
    "SensitivityTable",
    "choice_set",
    "load_cached",
    "measure_sensitivities",
    "model_digest",
    "option_name",
    "parse_option",
    "windows_description",
]


def model_digest(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers as they are in memory (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.data_ptr() in seen:  # a tied weight: its name is enough
            continue
        seen.add(t.data_ptr())
        flat = t.detach().contiguous().cpu().reshape(-1)
        h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return h.hexdigest()


def windows_description(windows: CalibrationConfig | torch.Tensor | None) -> str:
    """What the windows are, as the cache key and the table record it."""
    if windows is None:
        windows = DEFAULT_WINDOWS
    if isinstance(windows, torch.Tensor):
        digest = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:12]
        return f"ids {windows.shape[0]}x{windows.shape[1]} sha256:{digest}"
    return f"{windows.dataset} {windows.samples}x{windows.seq_len} seed {windows.seed} (calibration)"


def _window_ids(tokenizer, windows, data_dir) -> torch.Tensor:
    if windows is None:
        windows = DEFAULT_WINDOWS
    if isinstance(windows, torch.Tensor):
        if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
            raise RecipeError(
                f"windows must be (windows, tokens) ids with at least 2 tokens, got {tuple(windows.shape)}"
            )
        return windows
    is_file = any(windows.dataset.endswith(s) for s in (".txt", ".jsonl", ".gz", ".json"))
    if not is_file and windows.dataset not in CALIBRATION_SETS:
        raise RecipeError(
            f"sensitivities are measured on calibration or train text, never evaluation data: "
            f"{windows.dataset!r} is not one of {', '.join(CALIBRATION_SETS)} (or a text file)"
        )
    return calibration_ids(tokenizer, windows, data_dir=data_dir)


def _check_choices(model: nn.Module, options: list[str], group_size: int, method: str) -> None:
    if method not in METHODS:
        raise RecipeError(f"unknown sensitivity method {method!r}; choose one of {', '.join(METHODS)}")
    if not (group_size == -1 or (group_size > 0 and group_size & (group_size - 1) == 0)):
        raise RecipeError(f"group_size must be -1 (per row) or a positive power of 2, got {group_size}")
    widths = {lin.in_features for lin in linear_modules(decoder_layers(model)[0], ALL_PROJECTIONS).values()}
    for name in options:
        nm = parse_option(name).nm
        if nm is not None and any(w % nm[1] for w in widths):
            raise RecipeError(
                f"option {name}: the projections have {sorted(widths)} inputs, not all multiples of M={nm[1]}; "
                "choose patterns whose M divides them"
            )


def load_cached(
    model_digest: str,
    *,
    n_layers: int | None = None,
    tokens: int | None = None,
    patterns: Iterable[str] = DEFAULT_PATTERNS,
    bits: Iterable[int] = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    windows: CalibrationConfig | torch.Tensor | None = None,
    method: str = DEFAULT_METHOD,
    sym: bool = True,
    skip: bool = True,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> SensitivityTable | None:
    """The stored table for this key (complete or not), or None when there is none or it is refused.

    `n_layers` and `tokens`, when given, must match the stored table's (they follow from the model
    and the windows, so the key alone is enough)."""
    want = _empty_table(
        model_digest, n_layers or 0, tokens or 0, patterns, bits, group_size, windows, method, sym, skip
    )
    path = _cache_path(cache_dir, want, log or (lambda _msg: None))
    if path is None or not path.exists():
        return None
    try:
        return read_table(path, want, shape=n_layers is not None or tokens is not None)
    except CacheRefused as exc:
        if log is not None:
            log(f"sensitivities: refusing the cache file {path}: {exc}; measuring again")
        return None


def _empty_table(digest, n_layers, tokens, patterns, bits, group_size, windows, method, sym, skip):
    options = choice_set(patterns, bits, skip=skip)  # checks and normalizes the names
    pats = tuple(dict.fromkeys(parse_option(o).pattern for o in options if o != SKIP))
    bs = tuple(dict.fromkeys(parse_option(o).bits for o in options if o != SKIP))
    return SensitivityTable(
        model_digest=digest,
        n_layers=n_layers,
        patterns=pats,
        bits=bs,
        group_size=int(group_size),
        method=method,
        sym=bool(sym),
        windows=windows_description(windows),
        tokens=tokens,
        skip=skip,
    )


class _Pass:
    """One measuring pass: cached layer inputs of the baseline, then entry after entry."""

    def __init__(self, model, ids, table: SensitivityTable, *, cancel, damp_percent: float):
        self.model = model
        self.layers = list(decoder_layers(model))
        self.table = table
        self.cancel = cancel
        self.damp_percent = damp_percent
        self.labels = ids[:, 1:].reshape(-1)
        self.ids = ids
        self.kwargs: dict = {}
        self.inputs: list[torch.Tensor | None] = []

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("sensitivity pass cancelled")

    def nll(self, hidden: torch.Tensor) -> float:
        """Mean next-token NLL from the last layer's output (windows, T, H), head chunk by chunk."""
        x = self.model.model.norm(hidden[:, :-1]).reshape(-1, hidden.shape[-1])
        labels = self.labels.to(x.device)
        total = 0.0
        for s in range(0, x.shape[0], HEAD_CHUNK_TOKENS):
            self.check()
            total += float(
                head_token_nll(self.model, x[s : s + HEAD_CHUNK_TOKENS], labels[s : s + HEAD_CHUNK_TOKENS])
                .double()
                .sum()
            )
        return total / x.shape[0]

    def run_from(self, start: int, hidden: torch.Tensor, keep: bool = False) -> torch.Tensor:
        for li in range(start, len(self.layers)):
            self.check()
            if keep:
                self.inputs.append(hidden)
            hidden = layer_hidden(self.layers[li](hidden, use_cache=False, **self.kwargs))
        return hidden

    def baseline(self) -> float:
        first = capture_inputs(self.model, self.ids, batch_size=self.ids.shape[0])[0]
        self.kwargs = first.kwargs
        self.inputs = []
        return self.nll(self.run_from(0, first.hidden, keep=True))

    def prepare(self, layer: int, options: list[Option], group_size: int) -> dict[str, dict[str, torch.Tensor]]:
        """The layer's weights under each (non-skip) option, from the statistics of its cached input."""
        edits = [o for o in options if not o.skip]
        if not edits:
            return {}
        self.check()
        need_h = self.table.method == "gptq" and any(o.quantized for o in edits)
        stats = layer_stats(self.layers[layer], self.inputs[layer], self.kwargs, need_h)
        return option_weights(
            self.layers[layer],
            stats,
            edits,
            group_size=group_size,
            sym=self.table.sym,
            method=self.table.method,
            damp_percent=self.damp_percent,
            check=self.check,
        )

    def entry(self, layer: int, option: Option, weights: dict[str, torch.Tensor] | None) -> float:
        """Delta mean NLL with only `layer` changed: skipped, or its projections set to `weights`."""
        x = self.inputs[layer]
        out = x if option.skip else run_with(self.layers[layer], weights, x, self.kwargs)
        return self.nll(self.run_from(layer + 1, out)) - self.table.baseline_nll


@torch.inference_mode()
def measure_sensitivities(
    model: nn.Module,
    tokenizer,
    *,
    patterns: Iterable[str] = DEFAULT_PATTERNS,
    bits: Iterable[int] = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    windows: CalibrationConfig | torch.Tensor | None = None,
    method: str = DEFAULT_METHOD,
    cache_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    skip: bool = True,
    sym: bool = True,
    damp_percent: float = DAMP_PERCENT,
    data_dir: str | Path | None = None,
    digest: str | None = None,
    layers: Iterable[int] | None = None,
    store: bool = True,
) -> SensitivityTable:
    """The sensitivity table of `model` (see the module docstring), from the cache where it is there.

    `layers` limits the pass to some layers (the table is then partial: `complete` is False);
    `digest` saves hashing the weights when the caller knows it (`model_digest(model)`);
    `store=False` neither reads nor writes the cache. Raises `Cancelled` on a cancel and
    `RecipeError` (one line) for a choice set or windows that cannot be measured.
    """
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    options = choice_set(patterns, bits, skip=skip)
    _check_choices(model, options, int(group_size), method)
    ids = _window_ids(tokenizer, windows, data_dir)
    n_layers = len(decoder_layers(model))
    digest = digest or model_digest(model)
    table = _empty_table(
        digest, n_layers, ids.numel() - ids.shape[0], patterns, bits, group_size, windows, method, sym, skip
    )
    path = None
    if store:
        path = _cache_path(cache_dir, table, say)
        if path is not None and path.exists():
            try:
                cached = read_table(path, table)
                table.deltas, table.seconds = cached.deltas, cached.seconds
                table.baseline_nll, table.baseline_seconds = cached.baseline_nll, cached.baseline_seconds
                say(f"sensitivities: {sum(map(len, table.deltas.values()))} entries read from {path}")
            except CacheRefused as exc:
                say(f"sensitivities: refusing the cache file {path}: {exc}; measuring again")
    wanted = sorted(set(range(n_layers) if layers is None else layers))
    if any(not 0 <= li < n_layers for li in wanted):
        raise RecipeError(f"layers must be between 0 and {n_layers - 1}")
    todo = [(li, o) for li, o in table.missing() if li in wanted]
    if not todo:
        return table
    device = next(model.parameters()).device
    work = _Pass(model, ids.to(device), table, cancel=cancel, damp_percent=damp_percent)
    tb = time.perf_counter()
    base = work.baseline()
    if math.isnan(table.baseline_nll):
        table.baseline_nll, table.baseline_seconds = base, time.perf_counter() - tb
    elif abs(base - table.baseline_nll) > 1e-4 * max(1.0, abs(base)):
        say(
            f"sensitivities: the stored baseline NLL {table.baseline_nll:.6f} is not this model's {base:.6f}; measuring again"
        )
        table.deltas, table.seconds = {}, {}
        table.baseline_nll, table.baseline_seconds = base, time.perf_counter() - tb
        todo = [(li, o) for li, o in table.missing() if li in wanted]
    path = _save(path, table, say)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    share = 0.0  # the layer's preparation time, shared by its edited options
    for k, (li, name) in enumerate(todo):
        option = parse_option(name)
        if k == 0 or todo[k - 1][0] != li:  # todo goes layer by layer
            work.inputs[:li] = [None] * li  # free the inputs of layers that are done
            weights = {}
            work.check()
            if progress is not None:
                progress(k / len(todo), f"layer {li + 1}/{n_layers}, preparing")
            tp = time.perf_counter()
            later = [parse_option(o) for lj, o in todo[k:] if lj == li]
            weights = work.prepare(li, later, int(group_size))
            share = (time.perf_counter() - tp) / max(1, len(weights))
        work.check()
        if progress is not None:
            progress(k / len(todo), f"layer {li + 1}/{n_layers}, option {name}")
        te = time.perf_counter()
        delta = work.entry(li, option, weights.pop(name, None))
        table.put(li, name, delta, time.perf_counter() - te + (0.0 if option.skip else share))
        path = _save(path, table, say)
    if progress is not None:
        progress(1.0, f"{len(todo)} entries measured in {time.perf_counter() - t0:.1f} s")
    return table


def _cache_path(cache_dir, table: SensitivityTable, say) -> Path | None:
    """The table's file under `cache_dir` (default: the project's cache folder), None when refused."""
    try:
        return table_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), table)
    except UnsafeOutputPath as exc:
        say(f"sensitivities: refusing the cache file: {exc}; measuring without it")
        return None


def _save(path: Path | None, table: SensitivityTable, say) -> Path | None:
    """Write the table; on a refused or failing path say so once and go on without the file."""
    if path is None:
        return None
    try:
        write_table(path, table)
        return path
    except (UnsafeOutputPath, OSError) as exc:
        say(f"sensitivities: not caching to {path}: {exc}")
        return None
