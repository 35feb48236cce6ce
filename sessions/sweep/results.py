"""A sweep's results: the thesis' tables and a quality-vs-bytes Pareto front.

`thesis_tables(sessions)` picks the columns of the thesis' Table 4.1 / A.1 (configuration,
TriviaQA closed/open, PPL with its protocol, #params, size: the pruning grid) and Table 4.2 / A.2
(the same with LoRA type and quantization: rows that have either) out of `sessions.compare`'s
table, so the numbers are the ones `frankenlab compare` shows; `write_results` writes each as
md, csv, json and LaTeX plus `pareto.svg` into DIR/tables. The Pareto front keeps configurations
no other one beats on both size and quality; the budget line is a deployment target's weight
memory (Siracusa's 4 MiB MRAM by default).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from frankenlab.pipeline.atomic import atomic_write_text
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
    """A character plot: ● on the front, · off it, | the budget; log bytes across."""
    if not points:
        return "no configuration has both a size and a quality number yet\n"
    x0, x1, y0, y1, ylog = _bounds(points, budget[1] if budget else None)
    grid = [[" "] * width for _ in range(height)]
    if budget:
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
    if budget:
        lines.append(f"| budget: {budget[0]}, {fmt_bytes(budget[1])} of weights")
    lines.append(
        "front: "
        + ", ".join(
            f"{p.label} ({fmt_bytes(p.bytes)}, {p.quality:.4g})"
            for p in sorted(points, key=lambda p: p.bytes)
            if p.front
        )
    )
    return "\n".join(lines) + "\n"


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def pareto_svg(points: list[Point], title: str, lower: bool, budget: tuple[str, int] | None) -> str:
    """A self-contained SVG: points, the front as a step line, the budget as a dashed line."""
    W, H, L, R, T, B = 720, 440, 80, 30, 40, 60
    pw, ph = W - L - R, H - T - B
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">Pareto front: {_esc(title)} '
        f"({'lower' if lower else 'higher'} is better) vs weight bytes</text>",
        f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>',
    ]
    if not points:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no results yet</text></svg>')
        return "\n".join(out) + "\n"
    x0, x1, y0, y1, ylog = _bounds(points, budget[1] if budget else None)
    pad = (y1 - y0) * 0.08 or 1.0
    y0, y1 = (y0 / 1.1, y1 * 1.1) if ylog else (y0 - pad, y1 + pad)

    def px(b):
        return L + _scale(b, x0, x1, True) * pw

    def py(q):
        return T + ph - _scale(q, y0, y1, ylog) * ph

    for i in range(5):  # ticks
        b = 10 ** (math.log10(x0) + i * (math.log10(x1) - math.log10(x0)) / 4)
        q = 10 ** (math.log10(y0) + i * (math.log10(y1) - math.log10(y0)) / 4) if ylog else y0 + i * (y1 - y0) / 4
        out.append(f'<text x="{px(b):.1f}" y="{T + ph + 16}" text-anchor="middle">{_esc(fmt_bytes(int(b)))}</text>')
        out.append(f'<text x="{L - 6}" y="{py(q) + 4:.1f}" text-anchor="end">{q:.4g}</text>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 18}" text-anchor="middle">weights (log scale)</text>')
    out.append(f'<text transform="translate(18 {T + ph / 2}) rotate(-90)" text-anchor="middle">{_esc(title)}</text>')
    if budget:
        bx = px(budget[1])
        out.append(f'<line x1="{bx:.1f}" y1="{T}" x2="{bx:.1f}" y2="{T + ph}" stroke="#c00" stroke-dasharray="6 4"/>')
        out.append(
            f'<text x="{bx + 4:.1f}" y="{T + 12}" fill="#c00">{_esc(budget[0])}: {_esc(fmt_bytes(budget[1]))}</text>'
        )
    front = sorted((p for p in points if p.front), key=lambda p: p.bytes)
    if len(front) > 1:
        path = " ".join(f"{px(p.bytes):.1f},{py(p.quality):.1f}" for p in front)
        out.append(f'<polyline points="{path}" fill="none" stroke="#1565c0" stroke-width="1.5"/>')
    for p in points:
        colour = "#1565c0" if p.front else "#999"
        out.append(
            f'<circle cx="{px(p.bytes):.1f}" cy="{py(p.quality):.1f}" r="4" fill="{colour}">'
            f"<title>{_esc(p.label)}: {_esc(fmt_bytes(p.bytes))}, {p.quality:.4g}</title></circle>"
        )
        if p.front:
            out.append(
                f'<text x="{px(p.bytes) + 6:.1f}" y="{py(p.quality) - 6:.1f}" fill="#1565c0">'
                f"{_esc(p.label[:40])}</text>"
            )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_results(out: str | Path, sessions: list[Session] | None = None) -> dict:
    """DIR/tables/<table>.<md|csv|json|tex> and DIR/tables/pareto.svg; returns {name: [paths]}."""
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
    svg = d / "pareto.svg"
    atomic_write_text(svg, pareto_svg(points, title, lower, budget_bytes()))
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
    written["pareto"] = [str(svg), str(d / "pareto.json")]
    return written
