"""The planner's results drawn once, for `frankenlab plan` (printed) and the lab's Plan pane (shown).

Rich renderables, free of Textual: the predicted front as a table (`front_table`, the CLI's) and as
a braille scatter (`front_plot`: bytes across, perplexity up, both log; the chosen plan and the
budget marked), the chosen plan per source layer (`layer_map`: a coloured cell per layer, then the
ranges, short "0-3 none/16 · 4-5 2:4/4" or one described range a line), and the verdict
(`fit_line`: fits, or no fit with the smallest reachable footprint; `make_verdict` adds the budget,
the embeddings and, with no fit, what the budget could hold at all; it is what plan.json keeps).
"""

from __future__ import annotations

import math
from collections import Counter

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from frankenlab.pipeline.planner.options import SKIP, parse_option
from frankenlab.pipeline.units import fmt_bytes

TABLE_ROWS = 14  # front points shown in the table (spread over the front, plus the chosen and the smallest)
# one colour per option of a plan, in the order of the table's options ("skip" is dim)
PALETTE = ("#5fafff", "#87d75f", "#d7d75f", "#ffaf5f", "#ff5f87", "#af87ff", "#5fd7d7", "#d7875f", "#afafaf")
BRAILLE = 0x2800
DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))  # [x % 2][y % 4]


# -- the chosen plan per layer ------------------------------------------------------------------------
def layer_runs(choices, layers) -> list[tuple[int, int, str]]:
    """Consecutive source layers with the same option: (first, last, option)."""
    runs: list[list] = []
    for layer, c in zip(layers, choices, strict=True):
        if runs and runs[-1][2] == c and runs[-1][1] + 1 == layer:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer, c])
    return [(a, b, c) for a, b, c in runs]


def describe_option(option: str) -> str:
    o = parse_option(option)
    if o.skip:
        return "skip (removed by the depth stage)"
    width = "dense" if o.nm is None else f"{o.pattern} pruned"
    return f"{width}, {'bf16' if o.bits == 16 else f'int{o.bits}'}"


def option_colours(options) -> dict[str, str]:
    names = [o for o in options if o != SKIP]
    return {o: PALETTE[i % len(PALETTE)] for i, o in enumerate(names)} | {SKIP: "grey42"}


def layer_map(point, layers, options, *, title: str = "plan per layer", described: bool = False) -> Text:
    """A coloured cell per source layer (skip: ·), then the ranges: "0-3 none/16 · 4-5 2:4/4" on one
    line, or (`described`) one range a line with what its option does ("dense, int4")."""
    colours = option_colours(options)
    t = Text(f"{title} ", style="bold")
    for c in point.choices:
        t.append("·" if c == SKIP else "█", style=colours.get(c, "white"))
    t.append("\n")
    for i, (a, b, c) in enumerate(layer_runs(point.choices, layers)):
        span = str(a) if a == b else f"{a}-{b}"
        if described:
            t.append(("\n" if i else "") + f"  {span:>7}  ")
            t.append(describe_option(c), style=colours.get(c, "white"))
            continue
        if i:
            t.append(" · ", style="dim")
        t.append(span, style="bold")
        t.append(f" {c}", style=colours.get(c, "white"))
    return t


# -- the predicted front --------------------------------------------------------------------------------
def _summary(choices) -> str:
    counts = Counter(choices)
    return ", ".join(f"{n}x {o}" for o, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def shown_points(front, chosen, rows: int = TABLE_ROWS) -> list:
    pts = front.points
    if len(pts) <= rows:
        return list(pts)
    picks = {round(i * (len(pts) - 1) / (rows - 1)) for i in range(rows)}
    out = [pts[i] for i in sorted(picks)]
    if chosen is not None and chosen not in out:
        out = sorted([*out, chosen], key=lambda p: p.bytes)
    return out


def front_table(front, budget, chosen) -> Table:
    """Up to TABLE_ROWS front points spread over the front (the chosen one always, marked)."""
    t = Table(title=f"predicted front ({len(front.points)} points; {min(TABLE_ROWS, len(front.points))} shown)")
    for col in ("bytes", "of budget", "pred. ppl", "skipped", "options"):
        t.add_column(col, justify="right" if col != "options" else "left")
    for p in shown_points(front, chosen):
        share = f"{p.bytes / budget.bytes:.0%}" if budget is not None else "-"
        mark = "  [bold]<- chosen[/bold]" if p is chosen else ""
        t.add_row(
            fmt_bytes(p.bytes),
            share,
            f"{p.ppl:.4g}",
            str(sum(c == "skip" for c in p.choices)),
            escape(_summary([c for c in p.choices if c != "skip"])) + mark,
        )
    return t


def front_plot(front, budget_bytes: int | None, chosen=None, *, width: int = 44, height: int = 5) -> Text:
    """Predicted ppl (up, log) against weight bytes (across, log), in braille: ⠂ front, ◆ chosen, │ budget."""
    pts = [p for p in front.points if math.isfinite(p.ppl) and p.bytes > 0]
    if not pts:
        return Text("no finite prediction to plot", style="dim")
    best = min(p.ppl for p in pts)
    cap = best * 1e3  # above that a point sits on the top row
    xs = [p.bytes for p in pts] + ([budget_bytes] if budget_bytes else [])
    x0, x1 = math.log(min(xs) * 0.97), math.log(max(xs) * 1.03)
    y0, y1 = math.log(best), math.log(min(cap, max(p.ppl for p in pts)))
    y1 = y1 if y1 > y0 else y0 + 1e-9
    cells = [[0] * width for _ in range(height)]

    def dot_x(b: float) -> int:
        return min(2 * width - 1, max(0, round((math.log(b) - x0) / (x1 - x0) * (2 * width - 1))))

    def dot_y(ppl: float) -> int:
        v = min(math.log(ppl), y1)
        return min(4 * height - 1, max(0, 4 * height - 1 - round((v - y0) / (y1 - y0) * (4 * height - 1))))

    for p in pts:
        x, y = dot_x(p.bytes), dot_y(p.ppl)
        cells[y // 4][x // 2] |= DOTS[x % 2][y % 4]
    mark = None
    if chosen is not None and math.isfinite(chosen.ppl):
        mark = (dot_y(chosen.ppl) // 4, dot_x(chosen.bytes) // 2)
    bcol = dot_x(budget_bytes) // 2 if budget_bytes else None
    ticks = {0: f"{math.exp(y1):.4g}", height - 1: f"{math.exp(y0):.4g}"}
    out = Text("predicted ppl vs weight bytes (log-log): ", style="bold")
    out.append("⠂ front  ")
    out.append("◆ chosen  ", style="bold magenta")
    out.append("│ budget", style="yellow")
    for r in range(height):
        out.append(f"\n{ticks.get(r, ''):>8} ┤", style="dim")
        for c in range(width):
            if mark == (r, c):
                out.append("◆", style="bold magenta")
            elif cells[r][c]:
                out.append(chr(BRAILLE + cells[r][c]), style="yellow" if c == bcol else "cyan")
            elif c == bcol:
                out.append("│", style="yellow")
            else:
                out.append(" ")
    lo, hi = fmt_bytes(math.exp(x0)), fmt_bytes(math.exp(x1))
    out.append("\n" + " " * 9 + "└" + "─" * width, style="dim")
    out.append("\n" + " " * 10 + lo.ljust(max(len(lo) + 1, width - len(hi))) + hi, style="dim")
    if budget_bytes:
        out.append(f"\n{'':10}budget {fmt_bytes(budget_bytes)}; {len(front.points)} front points", style="dim")
    return out


# -- the verdict ------------------------------------------------------------------------------------------
def fit_line(front, budget, chosen, max_ppl: float | None = None) -> str:
    """The verdict in one line: fits (bytes of the budget, predicted ppl), or why nothing was chosen
    (the smallest reachable footprint; with `max_ppl`, the bound that no plan meets)."""
    base = math.exp(front.baseline_nll) if front.baseline_nll < 700 else math.inf
    if chosen is not None:
        head = f"fits: {fmt_bytes(chosen.bytes)}"
        if budget is not None:
            head += f" of {fmt_bytes(budget.bytes)} ({chosen.bytes / budget.bytes:.1%})"
        return (
            f"{head}, predicted ppl {chosen.ppl:.4g} (baseline {base:.4g}, on the sensitivity windows); "
            f"{sum(c == SKIP for c in chosen.choices)} of {len(chosen.choices)} layers skipped"
        )
    if budget is None:
        return (
            f"no plan reaches predicted ppl <= {max_ppl:g}: the best on the front is "
            f"{min(p.ppl for p in front.points):.4g} at {fmt_bytes(front.points[-1].bytes)}"
        )
    p = front.smallest_within(max_ppl) if max_ppl is not None else None
    if p is not None:
        return (
            f"no plan within predicted ppl {max_ppl:g} fits: the smallest needs {fmt_bytes(p.bytes)} "
            f"({p.bytes / budget.bytes:.2f}x the budget)"
        )
    s = front.smallest
    return (
        f"no plan fits {fmt_bytes(budget.bytes)}: the smallest reachable footprint is {fmt_bytes(s.bytes)} "
        f"({s.bytes / budget.bytes:.1f}x the budget; embeddings and head alone {fmt_bytes(front.fixed_bytes)}), "
        f"predicted ppl {s.ppl:.4g}"
    )


def verdict_text(front, budget, chosen) -> Text:
    """`fit_line`, green when a plan fits, red when none does (the Plan pane's verdict)."""
    return Text(fit_line(front, budget, chosen), style="bold green" if chosen is not None else "bold red")


def make_verdict(
    front, facts, budget, chosen, *, options, embed_format: str, group_size: int, max_ppl: float | None
) -> dict:
    """The CLI's verdict (kept in plan.json): the budget and how the embeddings are counted, `fit_line`,
    and when nothing fits the budget, what the most aggressive option searched could hold at all."""
    from frankenlab.pipeline.planner import budget as bd

    lines = []
    embed = f"embeddings and head at {embed_format}{' (tied: counted once)' if facts.tied else ''}"
    if budget is not None:
        header = f" ({fmt_bytes(budget.header)} of it kept for the compact file's header)" if budget.header else ""
        lines.append(f"budget: {budget.label} = {fmt_bytes(budget.bytes)} of weights{header}; {embed}")
        if budget.note:
            lines.append(budget.note)
    if embed_format != "bf16":
        lines.append(
            f"note: no stage quantizes embeddings yet; the recipe leaves them at 16 bits, "
            f"{fmt_bytes(bd.embed_bytes(facts, 'bf16') - front.fixed_bytes)} more than counted here"
        )
    aggressive = min((o for o in options if o != SKIP), key=lambda o: bd.bytes_per_param(facts, o, group_size))
    per_param = bd.bytes_per_param(facts, aggressive, group_size)
    out = {
        "fits": chosen is not None,
        "lines": lines,
        "smallest": front.smallest.to_dict(),
        "most_aggressive": aggressive,
    }
    lines.append(fit_line(front, budget, chosen, max_ppl))
    if chosen is not None or budget is None or (max_ppl is not None and front.smallest_within(max_ppl) is not None):
        return out
    holds = int(budget.bytes / per_param)
    out["largest_dense_params"] = holds
    lines.append(
        f"at the most aggressive format searched ({aggressive}: {8 * per_param:.2f} bits per weight with index "
        f"metadata, scales and zeros), {fmt_bytes(budget.bytes)} holds at most {_count(holds)} dense parameters "
        f"(this model has {_count(facts.params)}, {facts.params / max(holds, 1):.1f}x more)"
    )
    return out


def validation_table(measured, chosen) -> Table:
    """`frankenlab plan --validate`: each front point's bytes, predicted and measured perplexity."""
    t = Table(title="predicted vs measured (wikitext2-concat-512)")
    for col in ("plan", "bytes", "measured bytes", "pred. ppl", "measured ppl", "status"):
        t.add_column(col, justify="right" if col not in ("plan", "status") else "left")
    for m in measured:
        t.add_row(
            escape(m.label),
            fmt_bytes(m.point.bytes),
            fmt_bytes(m.measured_bytes),
            "-" if m.predicted_ppl is None else f"{m.predicted_ppl:.4g}",
            "-" if m.measured_ppl is None else f"{m.measured_ppl:.4g}",
            ("[bold]chosen[/bold] " if m.point is chosen else "") + escape(m.status),
        )
    return t


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)
