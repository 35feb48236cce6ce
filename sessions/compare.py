"""Many sessions as one table, like the thesis' appendix tables, derived from the data alone.

A row is one session's final model (or, with `all_stages`, every finished stage). Columns:
configuration (depth/width stages in order, "Depth 2 + Width 1:8", thesis N:M notation: N of
every M weights pruned), LoRA, quantization (GPTQ, EoRA), TriviaQA closed/open accuracy, one
perplexity column per protocol seen, any other metric by name and protocol, parameters, size
(from the memory footprint when the session has one), seconds. Values stay raw numbers in the
rows; `format_table` renders Markdown, CSV or JSON.

Accuracies (TriviaQA, HellaSwag) recorded with their question count get a 95 % Wilson interval
column beside them. The first row with a value is the reference ("ref"); a later value that lies
inside the reference's interval is marked "≈": at that question count the difference is noise.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

from frankenlab.evals.stats import wilson
from frankenlab.pipeline.stages import generic_description, known_kind
from frankenlab.pipeline.units import fmt_bytes
from frankenlab.sessions.printable import printable
from frankenlab.sessions.session import Session, StageRecord, finite

NM_NOTE = "N:M = N of every M consecutive weights pruned (thesis notation: 1:8 removes 12.5 %)"
QA_METRICS = {"triviaqa_closed": "TriviaQA closed", "triviaqa_open": "TriviaQA open"}
ACCURACIES = {**QA_METRICS, "hellaswag_acc": "HellaSwag acc", "hellaswag_acc_norm": "HellaSwag acc_norm"}
CI_NOTE = (
    "95 % CI: Wilson interval of an accuracy; ≈ = inside the interval of the column's first value (ref): "
    "a difference that is noise at that question count"
)


# -- describing stages ------------------------------------------------------------------------------
def describe_stage(kind: str, params: dict) -> str:
    """Short human text for one stage, e.g. "Depth 2", "Width 1:8", "LoRA r8 wikitext2", "GPTQ 4-bit g128":
    the stage kind's `describe` hook, or "Kind (k=v, ...)" for a kind this frankenlab does not know."""
    stype = known_kind(kind)
    return stype.describe(params or {}) if stype is not None else generic_description(kind, params)


def stage_role(kind: str) -> str:
    """Which column a stage goes to: "structure" (the configuration), "adapter" or "quant"."""
    stype = known_kind(kind)
    return stype.role if stype is not None else "structure"


def configuration(stages: list[StageRecord]) -> str:
    """The structural part (depth, width and unknown kinds): "Base" when there is none."""
    parts = [describe_stage(s.kind, s.params) for s in stages if s.index > 0 and stage_role(s.kind) == "structure"]
    return " + ".join(parts) or "Base"


def _join(stages: list[StageRecord], role: str) -> str | None:
    parts = [describe_stage(s.kind, s.params) for s in stages if s.index > 0 and stage_role(s.kind) == role]
    return " + ".join(parts) or None


SIZE_KEYS = {
    "weights": ("weights_bytes", "weights", "bytes", "total_bytes", "total"),
    "total": ("total_bytes", "total", "bytes"),
}


def footprint_bytes(footprint, which: str = "weights") -> int | None:
    """Bytes from a footprint record (pipeline.footprint.footprint_summary or an older shape):
    `weights` = the model's stored weights, `total` = weights + KV cache + activations."""
    if footprint is None:
        return None
    if isinstance(footprint, (int, float)) and not isinstance(footprint, bool):
        return int(footprint)
    if isinstance(footprint, dict):
        for key in SIZE_KEYS[which]:
            v = footprint.get(key)
            if isinstance(v, dict):
                v = footprint_bytes(v, which)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return int(v)
    return None


# -- the table --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    key: str
    title: str
    kind: str = "text"  # text | int | float | pct | bytes | seconds


@dataclass
class CompareTable:
    columns: list[Column]
    rows: list[dict] = field(default_factory=list)  # column key -> raw value (str, number or None)
    notes: list[str] = field(default_factory=list)

    def as_dicts(self) -> list[dict]:
        """Rows keyed by column title, in column order (what JSON and the TUI show)."""
        return [{c.title: r.get(c.key) for c in self.columns} for r in self.rows]


def _row(session: Session, stage: StageRecord, upto: list[StageRecord], all_stages: bool = False) -> dict:
    row = {
        "session": session.title,
        "id": session.id,
        "stage": stage.index,
        # the stage's own status: a finished stage is "done" even when the run was cancelled after it;
        # a row standing for the whole session adds how the run ended: "done (run cancelled)"
        "status": stage.status
        if all_stages or stage is not session.final_stage() or session.status in (stage.status, "running")
        else f"{stage.status} (run {session.status})",
        "configuration": configuration(upto),
        "lora": _join(upto, "adapter"),
        "quantization": _join(upto, "quant"),
        "params": stage.params_count,
        "params_nonzero": stage.params_nonzero,
        "layers": stage.num_layers,
        "size": footprint_bytes(stage.footprint, "weights"),
        "memory": footprint_bytes(stage.footprint, "total"),
        "seconds": stage.seconds if stage.reused_from is None else None,  # this stage's own time
    }
    for m in stage.metrics:
        row[_metric_key(m)] = m.get("value")
        if m["name"] in QA_METRICS and m.get("exact_match") is not None:
            row[_metric_key(m, "_em")] = m["exact_match"]
        interval = accuracy_interval(m)
        if interval is not None:
            row[_metric_key(m, "_ci")] = interval
    return row


def accuracy_interval(m: dict) -> tuple[float, float] | None:
    """The 95 % Wilson interval of an accuracy metric that says how many questions it counted."""
    n, value = m.get("n"), finite(m.get("value"))
    if m.get("name") not in ACCURACIES or not isinstance(n, int) or n <= 0 or value is None:
        return None
    ci = m.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return float(ci[0]), float(ci[1])
    return wilson(min(n, max(0, round(value * n))), n)


def _mark_noise(rows: list[dict], key: str, ci_key: str) -> None:
    """Replace each row's interval by its text: "6.2-14.4 %", "ref" on the first, "≈" inside the ref's."""
    ref = next((r for r in rows if r.get(ci_key) is not None and r.get(key) is not None), None)
    lo, hi = ref[ci_key] if ref is not None else (None, None)
    for r in rows:
        ci = r.get(ci_key)
        if ci is None:
            continue
        text = f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f} %"
        if r is ref:
            text += " ref"
        elif ref is not None and r.get(key) is not None and lo <= r[key] <= hi:
            text += " ≈"
        r[ci_key] = text


def _metric_key(m: dict, suffix: str = "") -> str:
    proto = m.get("protocol", "")
    return f"{m['name']}{suffix}[{proto}]" if proto else m["name"] + suffix


def compare_table(sessions: list[Session], *, all_stages: bool = False) -> CompareTable:
    """One row per session (its last finished stage), or per finished stage with `all_stages`."""
    rows, metric_cols = [], {}
    for s in sessions:
        done = [st for st in s.stages if st.status == "done"]
        targets = done if all_stages else done[-1:]
        if not targets:  # nothing finished: still show the session and why
            targets = []
            rows.append(
                {
                    "session": s.title,
                    "id": s.id,
                    "stage": None,
                    "status": s.status,
                    "configuration": configuration([st for st in s.stages if st.index > 0]),
                }
            )
        for st in targets:
            upto = [x for x in s.stages if x.index <= st.index and x.status == "done"]
            rows.append(_row(s, st, upto, all_stages))
            for m in st.metrics:
                metric_cols.setdefault(_metric_key(m), m)
    present = {k for r in rows for k, v in r.items() if v is not None}
    cols = [Column("session", "session"), Column("id", "id")]
    if all_stages:
        cols.append(Column("stage", "stage", "int"))
    cols += [
        Column("status", "status"),
        Column("configuration", "configuration"),
        Column("lora", "LoRA"),
        Column("quantization", "quantization"),
    ]
    # TriviaQA closed/open are always shown (as in the thesis' tables), one column per protocol seen:
    # numbers over different question sets are not comparable, so they never share a column.
    for name, title in QA_METRICS.items():
        seen = [(k, m) for k, m in metric_cols.items() if m["name"] == name]
        if not seen:
            cols.append(Column(name, f"{title} (acc)", "pct"))
        for key, m in seen:
            proto = f" [{m['protocol']}]" if m.get("protocol") else ""
            cols.append(Column(key, f"{title} (acc){proto}", "pct"))
            if _metric_key(m, "_ci") in present:
                cols.append(Column(_metric_key(m, "_ci"), f"{title} 95 % CI{proto}"))
            if _metric_key(m, "_em") in present:
                cols.append(Column(_metric_key(m, "_em"), f"{title} (exact match){proto}", "pct"))
    others = [(k, m) for k, m in metric_cols.items() if m["name"] not in QA_METRICS]
    for key, m in sorted(others, key=lambda kv: (kv[1]["name"] != "perplexity", kv[0])):
        if m["name"] == "perplexity":
            cols.append(Column(key, f"PPL [{m.get('protocol', '')}]", "float"))
        elif m["name"] in ACCURACIES:
            proto = f" [{m['protocol']}]" if m.get("protocol") else ""
            cols.append(Column(key, f"{ACCURACIES[m['name']]}{proto}", "pct"))
            if _metric_key(m, "_ci") in present:
                cols.append(Column(_metric_key(m, "_ci"), f"{ACCURACIES[m['name']]} 95 % CI{proto}"))
        else:
            cols.append(Column(key, key, "float"))
    for key, m in metric_cols.items():
        if _metric_key(m, "_ci") in present:
            _mark_noise(rows, key, _metric_key(m, "_ci"))
    cols += [
        Column("params", "params", "int"),
        Column("params_nonzero", "nonzero params", "int"),
        Column("layers", "layers", "int"),
        Column("size", "size (weights)", "bytes"),
        Column("memory", "memory (total)", "bytes"),
        Column("seconds", "seconds (stage)", "seconds"),
    ]
    notes = [NM_NOTE] if any(":" in (r.get("configuration") or "") for r in rows) else []
    if "size" not in present:
        notes.append("size: no memory footprint recorded in these sessions")
    if any("_ci[" in c.key or c.key.endswith("_ci") for c in cols):
        notes.append(CI_NOTE)
    return CompareTable(cols, rows, notes)


def compare_rows(sessions: list[Session], *, all_stages: bool = False) -> list[dict]:
    """Rows keyed by column title with raw values: the data behind `frankenlab compare`."""
    return compare_table(sessions, all_stages=all_stages).as_dicts()


# -- rendering --------------------------------------------------------------------------------------
def format_value(value, kind: str) -> str:
    """Human text for one cell (Markdown and the terminal table)."""
    if value is None:
        return "-"
    if kind == "pct" and isinstance(value, (int, float)):
        return f"{100 * value:.1f} %" if finite(value) is not None and abs(value) <= 1 else f"{value:.4g}"
    if kind == "float" and isinstance(value, (int, float)):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"
    if kind == "int" and isinstance(value, (int, float)):
        return f"{int(value):,}"
    if kind == "bytes" and isinstance(value, (int, float)):
        return fmt_bytes(int(value))
    if kind == "seconds" and isinstance(value, (int, float)):
        return f"{value:.1f}"
    return printable(value)  # a name from a file: no escape sequence reaches the terminal


def _md_cell(text: str) -> str:
    return printable(text).replace("|", "\\|")


def to_markdown(table: CompareTable) -> str:
    lines = [
        "| " + " | ".join(_md_cell(c.title) for c in table.columns) + " |",
        "|" + "|".join("---:" if c.kind != "text" else "---" for c in table.columns) + "|",
    ]
    for r in table.rows:
        lines.append("| " + " | ".join(_md_cell(format_value(r.get(c.key), c.kind)) for c in table.columns) + " |")
    if table.notes:
        lines += [""] + [f"*{n}*" for n in table.notes]
    return "\n".join(lines) + "\n"


def to_csv(table: CompareTable) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([printable(c.title) for c in table.columns])
    for r in table.rows:
        w.writerow([_csv_cell(r.get(c.key)) for c in table.columns])
    return buf.getvalue()


def _csv_cell(v):
    return "" if v is None else printable(v) if isinstance(v, str) else v


def _json_safe(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def to_json(table: CompareTable) -> str:
    rows = [{k: _json_safe(v) for k, v in r.items()} for r in table.as_dicts()]
    return (
        json.dumps({"columns": [c.title for c in table.columns], "rows": rows, "notes": table.notes}, indent=2) + "\n"
    )


FORMATS = {"md": to_markdown, "csv": to_csv, "json": to_json}


def format_table(table: CompareTable, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt](table)


def headline(session: Session) -> dict:
    """The few numbers a session list shows: configuration, first perplexity, TriviaQA, params, size."""
    final = session.final_stage()
    measured = next((s for s in reversed(session.stages) if s.status == "done" and s.metrics), None)
    ppl = measured.metric("perplexity") if measured else None
    out = {
        "configuration": configuration([s for s in session.stages if s.status == "done"]),
        "lora": _join([s for s in session.stages if s.status == "done"], "adapter"),
        "quantization": _join([s for s in session.stages if s.status == "done"], "quant"),
        "stages_done": sum(1 for s in session.stages if s.index > 0 and s.status == "done"),
        "stages": sum(1 for s in session.stages if s.index > 0),
        "measured_stage": measured.index if measured else None,
        "perplexity": ppl.get("value") if ppl else None,
        "protocol": ppl.get("protocol", "") if ppl else None,
        "params": final.params_count if final else None,
        "params_nonzero": final.params_nonzero if final else None,
        "size": footprint_bytes(final.footprint, "weights") if final else None,
        "memory": footprint_bytes(final.footprint, "total") if final else None,
    }
    for name in QA_METRICS:
        m = measured.metric(name) if measured else None
        out[name] = m.get("value") if m else None
    return out
