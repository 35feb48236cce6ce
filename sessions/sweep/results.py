"""A sweep's results: the thesis' tables and a quality-vs-bytes Pareto front.

`thesis_tables(sessions)` picks the columns of the thesis' Table 4.1 / A.1 (configuration,
TriviaQA closed/open, PPL with its protocol, #params, size: the pruning grid) and Table 4.2 / A.2
(the same with LoRA type and quantization: rows that have either) out of `sessions.compare`'s
table, so the numbers are the ones `frankenlab compare` shows; `write_results` writes each as
md, csv, json and LaTeX plus the Pareto figure (`pareto.svg`, `pareto.png`, drawn with matplotlib,
imported only when a figure is drawn) and its points (`pareto.json`) into DIR/tables. The Pareto
front keeps configurations no other one beats on both size and quality; the budget is a
deployment target's weight memory (Siracusa's 4 MiB MRAM by default).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from frankenlab.pipeline.atomic import atomic_path, atomic_write_text, guarded_path
from frankenlab.pipeline.units import fmt_bytes
from frankenlab.sessions.compare import Column, CompareTable, compare_table, format_table, format_value
from frankenlab.sessions.session import Session, SessionError, load_session
from frankenlab.sessions.sweep.run import RECORD_FILE, load_record

LATEX_SPECIALS = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    "≈": r"$\approx$",
}
FORMATS = ("md", "csv", "json", "tex")


def sweep_sessions(out: str | Path) -> tuple[dict, list[Session]]:
    """The sweep record and the sessions of its configurations written so far, in configuration order."""
    out = Path(out)
    record = load_record(out)
    if not record:
        raise SessionError(f"{out}: no sweep record ({RECORD_FILE}) here; run `frankenlab sweep FILE --out {out}`")
    sessions = []
    for c in record.get("configs", []):
        p = out / c["session"]
        if p.is_file():
            s = load_session(p)
            s.name = c["label"]
            sessions.append(s)
    return record, sessions


# -- the tables -------------------------------------------------------------------------------------
def _pick(full: CompareTable, rows: list[dict], with_training: bool) -> CompareTable:
    keep = [Column("configuration", "Config")]
    if with_training:
        keep += [Column("lora", "LoRA type"), Column("quantization", "Quantization")]
    for c in full.columns:
        if c.key.startswith(("triviaqa_closed", "triviaqa_open", "perplexity", "hellaswag")) and "_em" not in c.key:
            keep.append(c)
    keep += [
        Column("params", "#Params", "int"),
        Column("params_nonzero", "#Params (nonzero)", "int"),
        Column("size", "Size (weights)", "bytes"),
        Column("session", "session"),
    ]
    return CompareTable(keep, rows, list(full.notes))


def thesis_tables(sessions: list[Session]) -> dict[str, CompareTable]:
    """{"table-4.1": pruning-only rows, "table-4.2": rows with LoRA or quantization}; empty ones left out."""
    full = compare_table(sessions)
    plain = [r for r in full.rows if not r.get("lora") and not r.get("quantization")]
    trained = [r for r in full.rows if r.get("lora") or r.get("quantization")]
    out = {}
    if plain:
        out["table-4.1"] = _pick(full, plain, False)
    if trained:
        out["table-4.2"] = _pick(full, trained, True)
    return out


def _tex(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in text)


def to_latex(table: CompareTable, caption: str = "") -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); numbers as the Markdown table prints them."""
    align = "".join("l" if c.kind == "text" else "r" for c in table.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\begin{{tabular}}{{{align}}}",
        r"\toprule",
        " & ".join(_tex(c.title) for c in table.columns) + r" \\",
        r"\midrule",
    ]
    for r in table.rows:
        lines.append(" & ".join(_tex(format_value(r.get(c.key), c.kind)) for c in table.columns) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption or table.notes:
        lines.append(rf"\caption{{{_tex(' '.join([caption] + table.notes).strip())}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def render(table: CompareTable, fmt: str, caption: str = "") -> str:
    return to_latex(table, caption) if fmt == "tex" else format_table(table, fmt)


# -- the Pareto front -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    label: str
    bytes: int
    quality: float
    front: bool = False


def quality_metric(table: CompareTable) -> tuple[str, str, bool] | None:
    """(column key, title, lower is better): the first perplexity, else TriviaQA closed."""
    for c in table.columns:
        if c.key.startswith("perplexity"):
            return c.key, c.title, True
    for c in table.columns:
        if c.key.startswith("triviaqa_closed") and "_ci" not in c.key:
            return c.key, c.title, False
    return None


def pareto_points(sessions: list[Session]) -> tuple[list[Point], str, bool]:
    table = compare_table(sessions)
    metric = quality_metric(table)
    if metric is None:
        return [], "", True
    key, title, lower = metric
    pts = [(r.get("session") or r.get("configuration"), r.get("size"), r.get(key)) for r in table.rows]
    pts = [(lab, b, q) for lab, b, q in pts if isinstance(b, int) and isinstance(q, (int, float)) and math.isfinite(q)]
    best, front = None, set()
    for lab, _b, q in sorted(pts, key=lambda p: (p[1], p[2] if lower else -p[2])):
        if best is None or (q < best if lower else q > best):
            best = q
            front.add(lab)
    return [Point(lab, b, float(q), lab in front) for lab, b, q in pts], title, lower


def budget_bytes(target: str = "siracusa") -> tuple[str, int] | None:
    try:
        from frankenlab.pipeline.targets import load_targets

        t = load_targets().get(target)
    except Exception:  # noqa: BLE001 - a broken targets file must not stop the tables
        return None
    have = t.weights or t.memory if t else None
    return (t.label or t.name, int(have)) if have else None


def _scale(v: float, lo: float, hi: float, log: bool) -> float:
    if log:
        v, lo, hi = math.log10(v), math.log10(lo), math.log10(hi)
    return 0.5 if hi == lo else (v - lo) / (hi - lo)


def _bounds(points: list[Point], budget: int | None) -> tuple[float, float, float, float, bool]:
    xs = [p.bytes for p in points] + ([budget] if budget else [])
    ys = [p.quality for p in points]
    ylog = min(ys) > 0 and max(ys) / min(ys) > 10
    return min(xs) / 1.15, max(xs) * 1.15, min(ys), max(ys), ylog


def pareto_text(
    points: list[Point], title: str, budget: tuple[str, int] | None, width: int = 64, height: int = 14
) -> str:
    """A character plot: ● on the front, · off it, | the budget (when near the points); log bytes across."""
    if not points:
        return "no configuration has both a size and a quality number yet\n"
    on_scale = budget is not None and budget_on_scale(points, budget[1])
    x0, x1, y0, y1, ylog = _bounds(points, budget[1] if on_scale else None)
    grid = [[" "] * width for _ in range(height)]
    if on_scale:
        bx = round(_scale(budget[1], x0, x1, True) * (width - 1))
        for row in grid:
            row[bx] = "|"
    for p in sorted(points, key=lambda p: p.front):
        x = round(_scale(p.bytes, x0, x1, True) * (width - 1))
        y = height - 1 - round(_scale(p.quality, y0, y1, ylog) * (height - 1))
        grid[y][x] = "●" if p.front else "·"
    lines = [f"{title} (up) vs weights (across, log{'; quality log' if ylog else ''})"]
    ticks = {0: f"{y1:.4g}", height - 1: f"{y0:.4g}"}
    lines += [f"{ticks.get(i, ''):>9} ┤" + "".join(r) for i, r in enumerate(grid)]
    lines.append(" " * 10 + "└" + "─" * width)
    lines.append(" " * 11 + f"{fmt_bytes(int(x0))}".ljust(width - 10) + fmt_bytes(int(x1)))
    if on_scale:
        lines.append(f"| budget: {budget[0]}, {fmt_bytes(budget[1])} of weights")
    elif budget:
        lines.append(f"budget off the plot: {budget_note(points, budget)}")
    lines.append(
        "front: "
        + ", ".join(
            f"{p.label} ({fmt_bytes(p.bytes)}, {p.quality:.4g})"
            for p in sorted(points, key=lambda p: p.bytes)
            if p.front
        )
    )
    return "\n".join(lines) + "\n"


LABEL_CHARS = 28  # point labels longer than this are shortened in the middle
# the budget is drawn as a line only when it lies within this many data spans (log bytes) of the
# points; farther off it would squeeze every point into a sliver, so an arrow at the edge says it
BUDGET_SPANS = 0.5


def short_label(label: str, limit: int = LABEL_CHARS) -> str:
    """`label`, or shorter when longer than `limit` characters: a sweep's dotted keys lose their
    section ("width.pattern=2:4" -> "pattern=2:4"), then the middle gives way to "…"."""
    if len(label) <= limit:
        return label
    label = re.sub(r"\b[\w-]+\.([\w-]+=)", r"\1", label)
    if len(label) <= limit:
        return label
    head = (limit - 1) * 2 // 3
    return label[:head] + "…" + label[len(label) - (limit - 1 - head) :]


def _bytes_tick(v: float, _pos=None) -> str:
    return fmt_bytes(v).replace(".00 ", " ")


def _linear_bytes_ticks(ax) -> None:
    """Ticks at round numbers of one binary unit (0.7 MiB, 0.8 MiB, ...) on a linear bytes axis."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    lo, hi = ax.get_xlim()
    unit, name = next((1024**k, u) for k, u in reversed(list(enumerate(("B", "KiB", "MiB", "GiB")))) if hi >= 1024**k)
    ticks = [t * unit for t in MaxNLocator(nbins=6).tick_values(lo / unit, hi / unit) if lo <= t * unit <= hi]
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / unit:.4g} {name}"))


def budget_on_scale(points: list[Point], budget: int) -> bool:
    """Whether the budget line can share the x axis with the points without squeezing them."""
    lo, hi = math.log10(min(p.bytes for p in points)), math.log10(max(p.bytes for p in points))
    span = max(hi - lo, math.log10(2))
    return lo - BUDGET_SPANS * span <= math.log10(budget) <= hi + BUDGET_SPANS * span


def budget_note(points: list[Point], budget: tuple[str, int]) -> str:
    """ "Siracusa: 4 MiB budget, 23.5x to the left of every point" (the budget is off-scale)."""
    name, b = budget
    lo, hi = min(p.bytes for p in points), max(p.bytes for p in points)
    where = f"{lo / b:.1f}x to the left of every point" if b < lo else f"{b / hi:.1f}x to the right of every point"
    return f"{name}: {_bytes_tick(b)} budget, {where}"


def pareto_figure(points: list[Point], title: str, lower: bool, budget: tuple[str, int] | None):
    """The Pareto front as a matplotlib Figure (Agg canvas; pyplot's global state is never touched).

    Points (the front in blue, joined by a step line, the others grey), labelled with their
    configuration (`short_label`; each label at the first place near its point that stays inside
    the axes and off other labels and markers, the front's first: `_place_label`), bytes across (log
    scale when the points span more than 4x) and the quality with its protocol up. The budget is a
    dashed line when it is near the points (`budget_on_scale`), else an arrow at the axes' edge
    with a note of how far off it is (`budget_note`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator
    from matplotlib.transforms import Bbox

    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title("Pareto front: quality vs weight bytes", fontsize=12)
    ax.set_xlabel("weights (bytes)")
    ax.set_ylabel(f"{title} ({'lower' if lower else 'higher'} is better)" if title else "quality")
    if not points:
        ax.text(0.5, 0.5, "no results yet", transform=ax.transAxes, ha="center", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    xs = [p.bytes for p in points]
    if max(xs) / min(xs) > 4:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=2, numticks=10))  # binary sizes: 64 MiB, 128 MiB, ...
    ys = [p.quality for p in points]
    if min(ys) > 0 and max(ys) / min(ys) > 10:
        ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_bytes_tick))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, pos: ""))
    ax.grid(True, which="major", alpha=0.3)
    front = sorted((p for p in points if p.front), key=lambda p: p.bytes)
    rest = [p for p in points if not p.front]
    if rest:
        ax.scatter(
            [p.bytes for p in rest], [p.quality for p in rest], s=28, color="#9e9e9e", label="dominated", zorder=3
        )
    ax.scatter(
        [p.bytes for p in front], [p.quality for p in front], s=36, color="#1565c0", label="on the front", zorder=4
    )
    if len(front) > 1:
        ax.step([p.bytes for p in front], [p.quality for p in front], where="post", color="#1565c0", lw=1.2, zorder=2)
    ax.margins(x=0.08, y=0.12)
    if budget and budget_on_scale(points, budget[1]):
        ax.axvline(budget[1], color="#c62828", ls="--", lw=1.2, label=f"{budget[0]}: {_bytes_tick(budget[1])} budget")
    if ax.get_xscale() == "linear":
        _linear_bytes_ticks(ax)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.canvas.draw()  # settle the layout: labels are placed in display coordinates
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer).padded(-2)
    taken = [  # the markers, as boxes the labels keep off
        Bbox.from_bounds(x - 5, y - 5, 10, 10)
        for x, y in ax.transData.transform([(p.bytes, p.quality) for p in points])
    ]
    if budget and not budget_on_scale(points, budget[1]):
        left = budget[1] < min(xs)
        note = ax.annotate(
            budget_note(points, budget),
            xy=(0.0 if left else 1.0, 0.03),
            xycoords="axes fraction",
            xytext=(16 if left else -16, 0),
            textcoords="offset points",
            ha="left" if left else "right",
            va="bottom",
            color="#c62828",
            fontsize=8,
            arrowprops={"arrowstyle": "->", "color": "#c62828"},
            gid="budget-note",
        )
        taken.append(note.get_window_extent(renderer))
    for p in front + rest:  # the front first: its labels get the free places
        _place_label(ax, renderer, box, taken, p)
    return fig


# where a point's label may go, in order of preference: (dx, dy) in points from the marker
LABEL_SPOTS = [(6, 5), (-6, 5), (0, 9), (0, -9), (6, -5), (-6, -5), (6, 15), (-6, 15), (6, -15), (-6, -15)]


def _place_label(ax, renderer, box, taken: list, p: Point) -> None:
    """Label `p` at the first spot inside `box` that overlaps no box in `taken` (then taken too).

    A front point with no free spot takes the inside spot that overlaps least; a dominated point
    with no free spot stays unlabelled (pareto.json lists every point)."""
    best = None
    for dx, dy in LABEL_SPOTS:
        ann = ax.annotate(
            short_label(p.label),
            xy=(p.bytes, p.quality),
            xytext=(dx, dy),
            textcoords="offset points",
            ha="left" if dx > 0 else "right" if dx < 0 else "center",
            va="bottom" if dy > 0 else "top",
            fontsize=8,
            color="#0d47a1" if p.front else "#616161",
            gid="point-label",
        )
        ext = ann.get_window_extent(renderer)
        inside = box.x0 <= ext.x0 and ext.x1 <= box.x1 and box.y0 <= ext.y0 and ext.y1 <= box.y1
        overlap = sum(_overlap(ext, t) for t in taken)
        if inside and overlap == 0:
            if best is not None:
                best[0].remove()
            taken.append(ext)
            return
        if inside and p.front and (best is None or overlap < best[1]):
            if best is not None:
                best[0].remove()
            best = (ann, overlap, ext)
        else:
            ann.remove()
    if best is not None:
        taken.append(best[2])


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def save_figure(fig, folder: str | Path, stem: str) -> list[Path]:
    """`fig` as folder/stem.svg and folder/stem.png, each written atomically through the output guard."""
    from matplotlib import rc_context

    paths = []
    for fmt in ("svg", "png"):
        path = guarded_path(folder, f"{stem}.{fmt}")
        # SVG text stays text (searchable, selectable, smaller), not glyph outlines
        with atomic_path(path) as tmp, rc_context({"svg.fonttype": "none", "svg.hashsalt": "frankenlab"}):
            fig.savefig(tmp, format=fmt, bbox_inches="tight", pad_inches=0.1, dpi=150 if fmt == "png" else None)
        paths.append(path)
    return paths


def write_results(out: str | Path, sessions: list[Session] | None = None) -> dict:
    """DIR/tables/<table>.<md|csv|json|tex> and DIR/tables/pareto.<svg|png|json>; returns {name: [paths]}."""
    out = Path(out)
    if sessions is None:
        _, sessions = sweep_sessions(out)
    d = out / "tables"
    written = {}
    captions = {
        "table-4.1": "Pruned configurations (thesis Table 4.1 / A.1 layout).",
        "table-4.2": "LoRA and quantization (thesis Table 4.2 / A.2 layout).",
    }
    for name, table in thesis_tables(sessions).items():
        written[name] = []
        for fmt in FORMATS:
            p = d / f"{name}.{fmt}"
            atomic_write_text(p, render(table, fmt, captions.get(name, "")))
            written[name].append(str(p))
    points, title, lower = pareto_points(sessions)
    svg, png = save_figure(pareto_figure(points, title, lower, budget_bytes()), d, "pareto")
    atomic_write_text(
        d / "pareto.json",
        json.dumps(
            {
                "quality": title,
                "lower_is_better": lower,
                "points": [
                    {"label": p.label, "bytes": p.bytes, "quality": p.quality, "front": p.front} for p in points
                ],
            },
            indent=2,
        ),
    )
    written["pareto"] = [str(svg), str(png), str(d / "pareto.json")]
    return written
