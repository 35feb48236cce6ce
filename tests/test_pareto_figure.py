"""The sweep's Pareto figure (matplotlib): labels inside the frame, the budget said when off-scale, SVG and PNG
written through the output guard, matplotlib imported only when a figure is drawn."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from matplotlib.text import Annotation, Text

from frankenlab.pipeline.atomic import UnsafeOutputPath
from frankenlab.sessions.sweep.results import (
    LABEL_CHARS,
    Point,
    budget_on_scale,
    pareto_figure,
    pareto_text,
    save_figure,
    short_label,
)

MiB = 2**20
TITLE = "PPL [wikitext2-concat-512:first2]"
SIRACUSA = ("Siracusa", 4 * MiB)
# long labels, and front points at every edge of the data (smallest, largest, best, worst)
POINTS = [
    Point("Depth 4 + GPTQ 4-bit group 128 + EoRA rank 16 on attention and MLP", 70 * MiB, 80.3, True),
    Point("Depth 4 + GPTQ 4-bit group 128", 66 * MiB, 95.0, False),
    Point("Depth 2 (skip 27-28) + Width 2:4 + LoRA r8 attn+mlp", 180 * MiB, 48.2, True),
    Point("Depth 2 (skip 27-28) + Width 2:4", 180 * MiB, 61.0, False),
    Point("Width 2:4", 250 * MiB, 44.5, False),
    Point("Depth 4", 400 * MiB, 35.0, True),
    Point("Width 1:8 with a label long enough to run past any frame on its own", 480 * MiB, 29.1, True),
    Point("baseline (unmodified SmolLM2-135M-Instruct)", 540 * MiB, 28.2, True),
]

# a tiny sweep's shape: sizes within 2x (a linear axis), the budget off to the right, two pairs of near twins
TINY = [
    Point("width.pattern=1:8 recovery=none", 1153568, 464.80, False),
    Point("width.pattern=1:8 recovery=lora", 1153568, 464.45, False),
    Point("width.pattern=2:4 recovery=none", 725504, 419.09, False),
    Point("width.pattern=2:4 recovery=lora", 725504, 418.62, True),
]


def drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def texts(fig):
    """The figure's text artists that are drawn: visible, not empty, and no tick label beyond its axis' limits
    (matplotlib keeps those, unpainted, outside the frame)."""
    hidden = set()
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not min(lo, hi) <= tick.get_loc() <= max(lo, hi):
                    hidden.update({id(tick.label1), id(tick.label2)})
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


def inside(inner, outer, tol: float = 0.5) -> bool:
    return (
        inner.x0 >= outer.x0 - tol
        and inner.x1 <= outer.x1 + tol
        and inner.y0 >= outer.y0 - tol
        and inner.y1 <= outer.y1 + tol
    )


@pytest.mark.parametrize(
    "points, lower",
    [
        (POINTS, True),
        ([Point(p.label, p.bytes, 100 - p.quality, p.front) for p in POINTS], False),
        (TINY, True),
    ],
    ids=["lower-is-better", "higher-is-better", "tiny-sweep"],
)
def test_every_label_lies_inside_its_axes_and_the_figure(points, lower):
    fig = pareto_figure(points, TITLE, lower, SIRACUSA)
    renderer = drawn(fig)
    ax = fig.axes[0]
    ax_box, fig_box = ax.get_window_extent(renderer), fig.bbox
    labels = [t for t in texts(fig) if isinstance(t, Annotation) and t.get_gid() == "point-label"]
    front = [p for p in points if p.front]
    # every point on the front is labelled, shortened; a label never runs past the axes
    assert {t.get_text() for t in labels} >= {short_label(p.label) for p in front}
    assert all(len(t.get_text()) <= LABEL_CHARS for t in labels)
    for t in labels + [t for t in texts(fig) if t.get_gid() == "budget-note"]:
        assert inside(t.get_window_extent(renderer), ax_box), f"{t.get_text()!r} runs out of the axes"
    for t in texts(fig):  # titles, axis labels, ticks, legend: inside the figure before any cropping
        assert inside(t.get_window_extent(renderer), fig_box), f"{t.get_text()!r} runs out of the figure"
    # and no two labels sit on each other
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), "two point labels overlap"


def test_long_labels_are_shortened_keeping_what_differs():
    assert short_label("Width 2:4") == "Width 2:4"
    assert short_label("width.pattern=2:4 recovery=lora") == "pattern=2:4 recovery=lora"  # the key's section goes
    cut = short_label("Depth 2 (skip 27-28) + Width 2:4 + LoRA r8 attn+mlp")
    assert len(cut) == LABEL_CHARS and cut.startswith("Depth 2 (skip") and cut.endswith("attn+mlp") and "…" in cut


def test_a_narrow_span_gets_a_linear_axis_with_round_binary_ticks():
    fig = pareto_figure(TINY, TITLE, True, SIRACUSA)
    drawn(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear"
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert ticks and all(t.endswith(" MiB") and len(t.split()[0]) <= 4 for t in ticks), ticks
    note = [t.get_text() for t in texts(fig) if t.get_gid() == "budget-note"]
    assert note == ["Siracusa: 4 MiB budget, 3.6x to the right of every point"]


def test_axes_say_what_they_measure():
    fig = pareto_figure(POINTS, TITLE, True, SIRACUSA)
    drawn(fig)
    ax = fig.axes[0]
    assert ax.get_ylabel() == f"{TITLE} (lower is better)"  # the quality with its protocol
    assert ax.get_xscale() == "log" and "bytes" in ax.get_xlabel()  # 66 MiB .. 540 MiB: a wide span
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "128 MiB" in ticks and "256 MiB" in ticks


def test_far_budget_is_an_annotation_not_a_squeezed_axis():
    assert not budget_on_scale(POINTS, SIRACUSA[1])
    fig = pareto_figure(POINTS, TITLE, True, SIRACUSA)
    drawn(fig)
    ax = fig.axes[0]
    notes = [t for t in texts(fig) if t.get_gid() == "budget-note"]
    assert len(notes) == 1
    assert notes[0].get_text() == "Siracusa: 4 MiB budget, 16.5x to the left of every point"  # 66 MiB / 4 MiB
    assert ax.get_xlim()[0] > 32 * MiB, "the axis must not stretch to the far-off budget"
    assert not [line for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_near_budget_is_a_line():
    near = ("Board", 300 * MiB)
    assert budget_on_scale(POINTS, near[1])
    fig = pareto_figure(POINTS, TITLE, True, near)
    drawn(fig)
    ax = fig.axes[0]
    assert not [t for t in texts(fig) if t.get_gid() == "budget-note"]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [near[1], near[1]]


def test_text_plot_says_a_far_budget_instead_of_squeezing():
    far = pareto_text(POINTS, TITLE, SIRACUSA)
    assert "budget off the plot: Siracusa: 4 MiB budget, 16.5x to the left of every point" in far
    assert "┤|" not in far and " 4.00 MiB" not in far.splitlines()[-3]
    near = pareto_text(POINTS, TITLE, ("Board", 300 * MiB))
    assert "| budget: Board, 300.00 MiB of weights" in near and sum(line.count("|") for line in near.splitlines()) > 5


def test_svg_and_png_written_through_the_output_guard(tmp_path):
    fig = pareto_figure(POINTS, TITLE, True, SIRACUSA)
    svg, png = save_figure(fig, tmp_path, "pareto")
    assert (svg.name, png.name) == ("pareto.svg", "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    words = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "Siracusa: 4 MiB budget" in words and "Depth 4" in words  # text stays text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.png", "pareto.svg"]  # no temporary left

    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"keep")
    png.unlink()
    os.symlink(target, png)
    with pytest.raises(UnsafeOutputPath, match="symbolic link"):
        save_figure(fig, tmp_path, "pareto")
    assert target.read_bytes() == b"keep"
    with pytest.raises(UnsafeOutputPath):
        save_figure(fig, tmp_path, "../pareto")


def test_empty_sweep_still_draws_a_figure(tmp_path):
    fig = pareto_figure([], "", True, SIRACUSA)
    assert "no results yet" in [t.get_text() for t in texts(fig)]
    assert all(p.is_file() for p in save_figure(fig, tmp_path, "pareto"))


def test_matplotlib_is_imported_only_for_a_figure():
    code = (
        "import sys; import frankenlab.sessions.sweep.results, frankenlab.tui.cli.main; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
