"""The what-if first answer's interval: its width from the standard error, and its label (measured coverage only
where a benchmark measured it and it reached the claimed level; a rough guess otherwise)."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest

from frankenlab.pipeline.whatif import progressive
from frankenlab.pipeline.whatif.progressive import (
    CALIBRATED_ON,
    INTERVAL_LEVEL,
    INTERVAL_SCALE,
    INTERVAL_Z,
    Estimate,
    interval_halfwidth,
    interval_text,
)
from frankenlab.tui.widgets.whatif import estimate_line


def first_answer(protocol: str = CALIBRATED_ON[0], rows: int = CALIBRATED_ON[1], total_rows: int = CALIBRATED_ON[2]):
    return Estimate(63.2, 26.1, 0.4, 10, "0-9,11-29", True, protocol, 20, 255, 1020, rows, total_rows, stderr=2.0)


def test_the_z_is_the_claimed_levels_normal_quantile():
    assert INTERVAL_Z == pytest.approx(NormalDist().inv_cdf(0.5 + INTERVAL_LEVEL / 2), abs=1e-3)
    assert INTERVAL_SCALE >= 1.0, "calibration only ever widens the normal interval"


def test_halfwidth_from_the_standard_error():
    assert interval_halfwidth(2.0) == pytest.approx(2.0 * INTERVAL_Z * INTERVAL_SCALE)
    assert interval_halfwidth(2.0, scale=1.0) == pytest.approx(2.0 * INTERVAL_Z)
    assert interval_halfwidth(None) is None and interval_halfwidth(math.nan) is None


def test_measured_coverage_is_shown_only_where_measured_and_reached(monkeypatch):
    half = f"{2.0 * INTERVAL_Z * INTERVAL_SCALE:.2f}"
    enough = (round(INTERVAL_LEVEL * 60), 60)  # exactly the claimed level reaches it
    monkeypatch.setattr(progressive, "COVERAGE_MEASURED", enough)
    assert interval_text(first_answer()) == f"± {half} (covered {enough[0]} of 60 toggles on the bundled model)"
    # another slice, or a first answer from another share of it: not what was measured
    assert interval_text(first_answer(protocol="ids-2x32", rows=1, total_rows=2)) == f"rough guess ± {half}"
    assert interval_text(first_answer(rows=2)) == f"rough guess ± {half}"
    # short of the claimed level, or never measured: a rough guess
    monkeypatch.setattr(progressive, "COVERAGE_MEASURED", (enough[0] - 1, 60))
    assert interval_text(first_answer()) == f"rough guess ± {half}"
    monkeypatch.setattr(progressive, "COVERAGE_MEASURED", None)
    assert interval_text(first_answer()) == f"rough guess ± {half}"
    assert interval_text(Estimate(63.2, 26.1, 0.4, 10, "", True, CALIBRATED_ON[0], 20, 255, 1020, 1, 4)) == (
        "rough guess"
    )


def test_the_what_if_line_prints_the_label(monkeypatch):
    est = first_answer()
    monkeypatch.setattr(progressive, "COVERAGE_MEASURED", (57, 60))
    line = estimate_line(est, "skip 10").plain
    assert f"[{interval_text(est)} from 1/4 of the slice (255/1020 tokens); refining…]" in line
    assert "rough guess" not in line and "ppl ≈63.20" in line
    monkeypatch.setattr(progressive, "COVERAGE_MEASURED", (40, 60))
    assert "[rough guess ± " in estimate_line(est, "skip 10").plain


def test_the_coverage_benchmark_draws_distinct_seeded_plans():
    from benchmarks.bench_whatif_coverage import draw_plans, quantile

    plans = draw_plans(8, 12, seed=3)
    assert plans == draw_plans(8, 12, seed=3) and plans != draw_plans(8, 12, seed=4)
    assert len({p.order for _, p in plans}) == 12
    assert [k for k, _ in plans[:3]] == ["skip", "skip pair", "repeat"]
    shapes = {  # per kind: sorted run counts of an 8-layer plan
        "skip": [[0] + [1] * 7],
        "skip pair": [[0, 0] + [1] * 6],
        "repeat": [[1] * 7 + [2], [1] * 7 + [3]],
    }
    for kind, p in plans:
        assert sorted(p.counts()) in shapes[kind], (kind, p.to_text())
    every = draw_plans(4, 1000, seed=0)  # more than the kinds can make: all of them, then it stops
    assert len(every) == 4 + 6 + 8
    assert quantile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0 and quantile([3.0, 1.0, 2.0, 4.0], 0.9) == 4.0


def test_the_coverage_benchmark_runs_end_to_end(tiny_model_dir, data_dir, monkeypatch, capsys):
    from benchmarks.bench_whatif_coverage import main

    monkeypatch.setenv("FRANKENLAB_DATA_DIR", str(data_dir))
    figures = main(["--model", str(tiny_model_dir), "--toggles", "4", "--samples", "2", "--seq-len", "32"])
    out = capsys.readouterr().out
    assert figures["toggles"] == 4 and len(figures["rows"]) == 4
    assert figures["covered"] == sum(r["inside"] for r in figures["rows"])
    for r in figures["rows"]:  # each row's verdict is what its numbers say
        assert r["inside"] == (abs(r["refined_ppl"] - r["first_ppl"]) <= r["halfwidth"])
        assert r["halfwidth"] == pytest.approx(INTERVAL_Z * INTERVAL_SCALE * r["stderr"])
    assert f"coverage: {figures['covered']}/4 = " in out and "claimed 90%" in out and "process CPU" in out
