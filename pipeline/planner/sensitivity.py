"""Per-layer sensitivities: the change in log-perplexity when only one decoder layer takes one option.

API (what the planner's search uses)::

    table = measure_sensitivities(model, tokenizer, patterns=("none", "1:8", "1:4", "2:4", "8:16"),
                                  bits=(16, 8, 4, 3), group_size=128, windows=None, calibration=None,
                                  around=None, method="gptq", cache_dir=None, progress=None, cancel=None, log=None)
    table.delta(7, "2:4/4")   # mean NLL (nats/token) with layer 7 at 2:4 + 4-bit, minus the reference's
    table.offset              # the reference's NLL minus the unmodified model's (0 without `around`)
    table.layers, table.options, table.baseline_nll, table.to_dict(), SensitivityTable.from_dict(d)
    load_cached(model_digest(model), n_layers=30, ...)   # the stored table, or None, without measuring

An option is "skip" (the layer removed: identity) or "<pattern>/<bits>" (`options`): WANDA N:M on
the layer's own inputs, then its quantization alone in the GPTQ stage's format (`layer_edit`:
`method` "gptq", the default, or "rtn"). "none/16" is the layer unchanged (delta 0, not measured, unless
the table is measured `around` another option: then that option's delta is 0).

Two sets of windows, never the same text: the statistics of every edit (WANDA's input norms, GPTQ's
X^T X) come from the calibration windows (`calibration`, default the GPTQ and width stages' own: C4
train 32 x 128, seed 0), and the deltas are scored on other windows (`windows`, default WikiText-2
train 8 x 128; evaluation text is refused). Fitting GPTQ and scoring it on the same few hundred
tokens made low-bit options look almost free: with fewer tokens than input features, X^T X is
singular and GPTQ can hide its whole error on exactly those tokens.

Around an operating point (`around`, an option such as "8:16/4"): the reference is every layer at that
option, built as the stages would (layer by layer, each layer's statistics from the calibration
windows through the layers before it at the reference), and each entry changes one layer of the
reference. Deltas measured around the unmodified model add up badly where many layers change at once
(3-bit errors compound); around the plan's own neighbourhood the additive model is a local one.

How it is cheap: the scoring windows go through the reference once and the input of every layer is
kept (so are the calibration windows'). An entry (l, o) starts from the cached input of layer l, runs
layer l edited (or nothing, for skip), then layers l+1.. (at the reference) and the final norm and
blocked head (`evals.head`): nothing before l is recomputed. Layers are measured in order and a
layer's cached inputs are freed when its options are done.

Stored per key (model digest, choice set, group size, symmetry, windows, calibration, reference, method)
under the project's cache folder (`pipeline.loading.cache_dir()/sensitivity/`), rewritten atomically
after every entry: resumable (a rerun measures only what is missing; a kill -9 loses at most the entry
in progress; the reference is rebuilt, not stored), cancelable (`cancel()` is checked before every
layer forward, every projection edit and every head chunk: `evals.cancel.Cancelled` is raised, what is
measured stays stored), with `progress(fraction, "layer 7/30, option 2:4/4")`. A file that is not a
table for this key is refused in one line (`log`) and measured again.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
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
from frankenlab.pipeline.planner.layer_edit import (
    DAMP_PERCENT,
    METHODS,
    edited,
    layer_stats,
    option_weights,
    run_with,
)
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
# Scoring: 8 windows x 128 tokens of WikiText-2 train (1016 tokens scored). 3 x 128 of C4 (381 tokens)
# gave deltas with ~0.01 nats of noise, as large as many layers' effects (docs/benchmarks.md).
DEFAULT_WINDOWS = CalibrationConfig(dataset="wikitext2-train", samples=8, seq_len=128, seed=0)
# Statistics: the width and GPTQ stages' own calibration (C4 train 32 x 128, seed 0: 4096 tokens).
DEFAULT_CALIBRATION = CalibrationConfig()
CALIBRATION_SETS = ("c4", "wikitext2-train")  # named sets that are not evaluation data

ProgressFn = Callable[[float, str], None]

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_CALIBRATION",
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
    "measure_plans",
    "measure_sensitivities",
    "model_digest",
    "option_name",
    "parse_option",
    "reference_option",
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


def windows_description(
    windows: CalibrationConfig | torch.Tensor | None, default: CalibrationConfig = DEFAULT_WINDOWS
) -> str:
    """What the windows are, as the cache key and the table record it (`default` for None)."""
    if windows is None:
        windows = default
    if isinstance(windows, torch.Tensor):
        digest = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:12]
        return f"ids {windows.shape[0]}x{windows.shape[1]} sha256:{digest}"
    return f"{windows.dataset} {windows.samples}x{windows.seq_len} seed {windows.seed} (calibration)"


def _window_ids(tokenizer, windows, data_dir, default: CalibrationConfig = DEFAULT_WINDOWS) -> torch.Tensor:
    if windows is None:
        windows = default
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


def _check_choices(model: nn.Module, options: list[str], group_size: int, method: str, around: str | None) -> None:
    if around is not None and around not in options:
        raise RecipeError(
            f"the reference option {around!r} is not one of the choice set's options ({', '.join(options[1:])}); "
            "measure around one of them"
        )
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
    calibration: CalibrationConfig | torch.Tensor | None = None,
    around: str | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> SensitivityTable | None:
    """The stored table for this key (complete or not), or None when there is none or it is refused.

    `n_layers` and `tokens`, when given, must match the stored table's (they follow from the model
    and the windows, so the key alone is enough)."""
    want = _empty_table(
        model_digest,
        n_layers or 0,
        tokens or 0,
        patterns,
        bits,
        group_size,
        windows,
        method,
        sym,
        skip,
        calibration,
        around,
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


def _empty_table(digest, n_layers, tokens, patterns, bits, group_size, windows, method, sym, skip, calibration, around):
    options = choice_set(patterns, bits, skip=skip)  # checks and normalizes the names
    around = reference_option(around)
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
        around=around,
        calibration=windows_description(calibration, DEFAULT_CALIBRATION),
    )


def reference_option(around: str | None) -> str | None:
    """The reference option's name (None: the unmodified model); "skip" cannot be a reference."""
    if around is None or str(around).strip().lower() in ("", "none/16"):
        return None
    try:
        opt = parse_option(around)
    except OptionError as exc:
        raise RecipeError(f"reference option: {exc}") from None
    if opt.skip:
        raise RecipeError("the reference cannot be 'skip' (every layer removed): give an option such as 8:16/4")
    return opt.name


class _Pass:
    """One measuring pass: cached layer inputs of the reference (scoring and calibration windows), then
    entry after entry."""

    def __init__(self, model, ids, calib, table: SensitivityTable, *, cancel, damp_percent: float):
        self.model = model
        self.layers = list(decoder_layers(model))
        self.table = table
        self.cancel = cancel
        self.damp_percent = damp_percent
        self.labels = ids[:, 1:].reshape(-1)
        self.ids = ids
        self.calib = calib
        self.kwargs: dict = {}
        self.calib_kwargs: dict = {}
        self.inputs: list[torch.Tensor | None] = []  # per layer, its input on the scoring windows
        self.calib_inputs: list[torch.Tensor | None] = []  # per layer, its input on the calibration windows
        self.reference: list[dict[str, torch.Tensor]] = []  # per layer, its weights at `around`
        self.originals: list[dict[str, torch.Tensor]] = []

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
        """The unmodified model's NLL on the scoring windows (every layer's input kept)."""
        first = capture_inputs(self.model, self.ids, batch_size=self.ids.shape[0])[0]
        self.kwargs = first.kwargs
        self.inputs = []
        return self.nll(self.run_from(0, first.hidden, keep=True))

    def build(
        self, plan: list[Option] | None, group_size: int, progress: ProgressFn | None, keep: bool = True
    ) -> float | None:
        """Every layer's input on the calibration windows; with `plan` (one option per layer), the model
        built layer by layer as the stages would (each layer's statistics from the calibration windows
        through the built layers before it; a skipped layer passes its input on), the scoring inputs
        re-taken through it, and its NLL on the scoring windows returned. `keep` keeps the built
        weights and every layer's inputs for entries around it (a reference: no skip in it)."""
        first = capture_inputs(self.model, self.calib, batch_size=self.calib.shape[0])[0]
        self.calib_kwargs = first.kwargs
        c = first.hidden
        s = self.inputs[0] if plan is not None else None
        calib_inputs, scoring, built = [], [], []
        for li, layer in enumerate(self.layers):
            self.check()
            if keep:
                calib_inputs.append(c)
            if plan is None:
                c = layer_hidden(layer(c, use_cache=False, **self.calib_kwargs))
                continue
            option = plan[li]
            if progress is not None:
                progress(
                    li / len(self.layers),
                    f"{'reference ' + option.name if keep else 'plan'}: layer {li + 1}/{len(self.layers)}",
                )
            if keep:
                scoring.append(s)
            if option.skip:
                continue
            weights = self.edit(li, [option], group_size, c)[option.name]
            if keep:
                built.append(weights)
            c = run_with(layer, weights, c, self.calib_kwargs)
            s = run_with(layer, weights, s, self.kwargs)
        if keep:
            self.calib_inputs, self.reference = calib_inputs, built
        if plan is None:
            return None
        if keep:
            self.inputs = scoring
        return self.nll(s)

    def edit(
        self, layer: int, options: list[Option], group_size: int, calib: torch.Tensor | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The layer's own weights under each (non-skip) option, from the statistics of its calibration
        input (`calib`, default the one kept for the layer)."""
        edits = [o for o in options if not o.skip]
        if not edits:
            return {}
        self.check()
        need_h = self.table.method == "gptq" and any(o.quantized for o in edits)
        x = self.calib_inputs[layer] if calib is None else calib
        with self.own_weights(layer):
            stats = layer_stats(self.layers[layer], x, self.calib_kwargs, need_h)
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

    @contextlib.contextmanager
    def own_weights(self, layer: int) -> Iterator[None]:
        """Layer `layer` at its own (unmodified) weights inside, whatever is installed."""
        if not self.originals:
            yield
            return
        with edited(self.layers[layer]) as linears:
            for name, w in self.originals[layer].items():
                linears[name].weight.data = w
            yield

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Every layer at the reference's weights inside (nothing to do without `around`); the model's
        own tensors are given back on the way out, also on a cancel."""
        if not self.reference:
            yield
            return
        stack = contextlib.ExitStack()
        with stack:
            for li, layer in enumerate(self.layers):
                linears = stack.enter_context(edited(layer))
                self.originals.append({name: lin.weight.data for name, lin in linears.items()})
                for name, w in self.reference[li].items():
                    linears[name].weight.data = w
            try:
                yield
            finally:
                self.originals = []

    def entry(self, layer: int, option: Option, weights: dict[str, torch.Tensor] | None) -> float:
        """Delta mean NLL with only `layer` of the reference changed: skipped, or its projections set to `weights`."""
        x = self.inputs[layer]
        out = x if option.skip else run_with(self.layers[layer], weights, x, self.kwargs)
        level = self.table.baseline_nll if self.table.around is None else self.table.reference_nll
        return self.nll(self.run_from(layer + 1, out)) - level


@torch.inference_mode()
def measure_sensitivities(
    model: nn.Module,
    tokenizer,
    *,
    patterns: Iterable[str] = DEFAULT_PATTERNS,
    bits: Iterable[int] = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    windows: CalibrationConfig | torch.Tensor | None = None,
    calibration: CalibrationConfig | torch.Tensor | None = None,
    around: str | None = None,
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

    `windows` are scored, `calibration` gives the edits' statistics (they must not share a window);
    `around` measures around every layer at that option (its `reference_nll` is filled in even when
    `layers=[]`); `layers` limits the pass to some layers (the table is then partial: `complete` is
    False); `digest` saves hashing the weights when the caller knows it (`model_digest(model)`);
    `store=False` neither reads nor writes the cache. Raises `Cancelled` on a cancel and
    `RecipeError` (one line) for a choice set or windows that cannot be measured.
    """
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    options = choice_set(patterns, bits, skip=skip)
    around = reference_option(around)
    _check_choices(model, options, int(group_size), method, around)
    ids = _window_ids(tokenizer, windows, data_dir)
    calib = _window_ids(tokenizer, calibration, data_dir, DEFAULT_CALIBRATION)
    _check_disjoint(ids, calib)
    n_layers = len(decoder_layers(model))
    digest = digest or model_digest(model)
    table = _empty_table(
        digest,
        n_layers,
        ids.numel() - ids.shape[0],
        patterns,
        bits,
        group_size,
        windows,
        method,
        sym,
        skip,
        calibration,
        around,
    )
    path = None
    if store:
        path = _cache_path(cache_dir, table, say)
        if path is not None and path.exists():
            try:
                cached = read_table(path, table)
                table.deltas, table.seconds = cached.deltas, cached.seconds
                table.baseline_nll, table.baseline_seconds = cached.baseline_nll, cached.baseline_seconds
                table.reference_nll = cached.reference_nll
                say(f"sensitivities: {sum(map(len, table.deltas.values()))} entries read from {path}")
            except CacheRefused as exc:
                say(f"sensitivities: refusing the cache file {path}: {exc}; measuring again")
    wanted = sorted(set(range(n_layers) if layers is None else layers))
    if any(not 0 <= li < n_layers for li in wanted):
        raise RecipeError(f"layers must be between 0 and {n_layers - 1}")
    todo = [(li, o) for li, o in table.missing() if li in wanted]
    if not todo and (around is None or not math.isnan(table.reference_nll)):
        return table
    device = next(model.parameters()).device
    work = _Pass(model, ids.to(device), calib.to(device), table, cancel=cancel, damp_percent=damp_percent)
    tb = time.perf_counter()
    base = work.baseline()
    ref = work.build(None if around is None else [parse_option(around)] * n_layers, int(group_size), progress)
    fresh = math.isnan(table.baseline_nll)
    if not fresh and not _same_nll(base, table.baseline_nll):
        say(
            f"sensitivities: the stored baseline NLL {table.baseline_nll:.6f} is not this model's {base:.6f}; measuring again"
        )
        fresh = True
    elif (
        not fresh
        and ref is not None
        and not math.isnan(table.reference_nll)
        and not _same_nll(ref, table.reference_nll)
    ):
        say(
            f"sensitivities: the stored reference NLL {table.reference_nll:.6f} is not this reference's "
            f"{ref:.6f}; measuring again"
        )
        fresh = True
    if fresh:
        table.deltas, table.seconds = {}, {}
        table.baseline_nll, table.baseline_seconds = base, time.perf_counter() - tb
        todo = [(li, o) for li, o in table.missing() if li in wanted]
    if ref is not None:
        table.reference_nll = ref
    path = _save(path, table, say)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    share = 0.0  # the layer's preparation time, shared by its edited options
    with work.installed():
        for k, (li, name) in enumerate(todo):
            option = parse_option(name)
            if k == 0 or todo[k - 1][0] != li:  # todo goes layer by layer
                work.inputs[:li] = [None] * li  # free the inputs of layers that are done
                work.calib_inputs[:li] = [None] * li
                weights = {}
                work.check()
                if progress is not None:
                    progress(k / len(todo), f"layer {li + 1}/{n_layers}, preparing")
                tp = time.perf_counter()
                later = [parse_option(o) for lj, o in todo[k:] if lj == li]
                weights = work.edit(li, later, int(group_size))
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


@torch.inference_mode()
def measure_plans(
    model: nn.Module,
    tokenizer,
    plans: Iterable[Iterable[str]],
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    windows: CalibrationConfig | torch.Tensor | None = None,
    calibration: CalibrationConfig | torch.Tensor | None = None,
    method: str = DEFAULT_METHOD,
    sym: bool = True,
    damp_percent: float = DAMP_PERCENT,
    data_dir: str | Path | None = None,
    cancel: Callable[[], bool] | None = None,
    progress: ProgressFn | None = None,
) -> tuple[float, list[float]]:
    """(the unmodified model's NLL, each plan's NLL) on the scoring windows: every plan (one option per
    decoder layer, "skip" allowed) built layer by layer as the stages would, with the statistics from
    the calibration windows, and scored whole. No table, no cache: the numbers the additive model
    predicts, measured. The model is unchanged afterwards (also on a cancel)."""
    plans = [[parse_option(o) for o in plan] for plan in plans]
    n_layers = len(decoder_layers(model))
    if any(len(plan) != n_layers for plan in plans):
        raise RecipeError(f"a plan needs one option per decoder layer ({n_layers})")
    names = sorted({o.name for plan in plans for o in plan if not o.skip})
    nms = sorted({o.pattern for plan in plans for o in plan if not o.skip})
    _check_choices(model, [SKIP, *names], int(group_size), method, None)
    ids = _window_ids(tokenizer, windows, data_dir)
    calib = _window_ids(tokenizer, calibration, data_dir, DEFAULT_CALIBRATION)
    _check_disjoint(ids, calib)
    bits = sorted({o.bits for plan in plans for o in plan if not o.skip} | {16})
    table = _empty_table(
        "", n_layers, 0, nms or ["none"], bits, group_size, windows, method, sym, True, calibration, None
    )
    device = next(model.parameters()).device
    work = _Pass(model, ids.to(device), calib.to(device), table, cancel=cancel, damp_percent=damp_percent)
    base = work.baseline()
    out = []
    for k, plan in enumerate(plans):
        step = (
            None
            if progress is None
            else (lambda f, text, k=k: progress((k + f) / len(plans), f"plan {k + 1}/{len(plans)}, {text}"))
        )
        out.append(work.build(plan, int(group_size), step, keep=False))
    return base, out


def _same_nll(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(a))


def _check_disjoint(ids: torch.Tensor, calib: torch.Tensor) -> None:
    """Scoring windows that are also calibration windows would score the edits on the text they were fitted to."""
    if ids.shape[1] == calib.shape[1] and bool((ids[:, None, :] == calib[None, :, :]).all(-1).any()):
        raise RecipeError(
            "the sensitivity windows share a window with the calibration windows: score on other text "
            "(another dataset or seed)"
        )


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
