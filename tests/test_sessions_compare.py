"""`frankenlab compare` / `frankenlab sessions`: tables derived from session data, in every format."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from frankenlab.sessions import (
    Session,
    StageRecord,
    compare_rows,
    compare_table,
    describe_stage,
    format_table,
    headline,
)
from frankenlab.tui.cli.main import main

PPL = "wikitext2-rows-512"
PPL2 = "wikitext2-concat-512:first32"
TQC = "TriviaQA closed (acc) [triviaqa-closed-validation:200]"
TQO = "TriviaQA open (acc) [nq-open-oracle-openbook:200]"


def _metrics(ppl=None, closed=None, open_=None, em=None, proto=PPL):
    out = []
    if ppl is not None:
        out.append({"name": "perplexity", "value": ppl, "protocol": proto})
    if closed is not None:
        out.append(
            {
                "name": "triviaqa_closed",
                "value": closed,
                "protocol": "triviaqa-closed-validation:200",
                **({"exact_match": em} if em is not None else {}),
            }
        )
    if open_ is not None:
        out.append({"name": "triviaqa_open", "value": open_, "protocol": "nq-open-oracle-openbook:200"})
    return out


def make(name, stages, status="done", created=1.0) -> Session:
    recs = [
        StageRecord(
            0,
            "baseline",
            "baseline",
            status="done",
            metrics=_metrics(26.61, 0.42, 0.61, 0.30),
            params_count=1_235_814_400,
            params_nonzero=1_235_814_400,
            num_layers=16,
            seconds=10.0,
        )
    ]
    for i, (kind, params, st_status, metrics, extra) in enumerate(stages, 1):
        recs.append(StageRecord(i, kind, kind, params, st_status, metrics, seconds=5.0, **extra))
    return Session(
        recipe={"name": name, "stages": [{"kind": k, **p} for k, p, *_ in stages]},
        stages=recs,
        status=status,
        created=created,
        id=f"{name[:6]:0<6}abcdef"[:12],
    )


@pytest.fixture
def sessions():
    base = make("base", [])
    depth_width = make(
        "dw",
        [
            (
                "depth",
                {"k": 2, "metric": "perplexity"},
                "done",
                _metrics(30.5),
                {"params_count": 1_100_000_000, "params_nonzero": 1_100_000_000, "num_layers": 14},
            ),
            (
                "width",
                {"pattern": "1:8", "method": "wanda"},
                "done",
                _metrics(33.25, 0.30, 0.5),
                {
                    "params_count": 1_100_000_000,
                    "params_nonzero": 990_000_000,
                    "num_layers": 14,
                    "footprint": {"weights_bytes": 3 * (1 << 30), "total_bytes": (3 << 30) + (5 << 20)},
                },
            ),
        ],
        created=2.0,
    )
    full = make(
        "full",
        [
            ("width", {"n": 2, "m": 4, "method": "wanda"}, "done", [], {}),
            ("lora", {"rank": 8, "dataset": "wikitext2-train", "dropout": 0.1}, "done", _metrics(40.0), {}),
            ("gptq", {"bits": 4, "group_size": 128}, "done", [], {}),
            (
                "eora",
                {"rank": 32},
                "done",
                _metrics(41.0, 0.2, 0.45, 0.1, proto=PPL2),
                {"params_count": 900, "params_nonzero": 800, "footprint": {"weights": {"bytes": 1 << 20}}},
            ),
        ],
        created=3.0,
    )
    failed = make(
        "failed",
        [("depth", {"k": 40}, "failed", [], {"error": "cannot remove 40 layers"})],
        status="failed",
        created=4.0,
    )
    failed.stages[0].status = "skipped"  # nothing finished at all
    return [base, depth_width, full, failed]


def test_describe_stage_covers_every_kind():
    assert describe_stage("depth", {"k": 2, "metric": "perplexity"}) == "Depth 2"
    assert describe_stage("depth", {"k": 3, "metric": "taylor"}) == "Depth 3 (taylor)"
    assert describe_stage("depth", {"layers": [4, 5]}) == "Depth -[4,5]"
    assert describe_stage("depth", {"plan": "0-3,5,5"}) == "Plan 0-3,5,5"
    assert describe_stage("width", {"pattern": "1:8"}) == "Width 1:8"
    assert describe_stage("width", {"n": 12, "m": 16, "method": "magnitude"}) == "Width 12:16 (magnitude)"
    assert describe_stage("width", {"ratio": 0.5}) == "Width 50% unstructured"
    assert describe_stage("lora", {"rank": 8, "dataset": "triviaqa"}) == "LoRA r8 triviaqa"
    assert describe_stage("gptq", {"bits": 4, "group_size": 128}) == "GPTQ 4-bit g128"
    assert describe_stage("eora", {"rank": 32}) == "EoRA r32"
    assert describe_stage("newkind", {"alpha": 0.5}) == "Newkind (alpha=0.5)"


def test_rows_derive_columns_from_the_data(sessions):
    rows = compare_rows(sessions)
    assert [r["session"] for r in rows] == ["base", "dw", "full", "failed"]
    base, dw, full, failed = rows
    assert base["configuration"] == "Base" and base["LoRA"] is None and base["quantization"] is None
    assert base[TQC] == 0.42 and base["TriviaQA closed (exact match) [triviaqa-closed-validation:200]"] == 0.30
    assert base[f"PPL [{PPL}]"] == 26.61 and base["params"] == 1_235_814_400
    assert dw["configuration"] == "Depth 2 + Width 1:8"
    assert dw[f"PPL [{PPL}]"] == 33.25 and dw["nonzero params"] == 990_000_000
    assert dw["size (weights)"] == 3 << 30 and dw["memory (total)"] == (3 << 30) + (5 << 20)
    assert dw[TQO] == 0.5
    assert full["configuration"] == "Width 2:4"
    assert full["LoRA"] == "LoRA r8 wikitext2-train"
    assert full["quantization"] == "GPTQ 4-bit g128 + EoRA r32"
    assert full[f"PPL [{PPL2}]"] == 41.0 and full[f"PPL [{PPL}]"] is None  # one column per protocol
    assert full["size (weights)"] == 1 << 20 and full["memory (total)"] is None
    assert failed["status"] == "failed" and failed["configuration"] == "Depth 40" and failed["params"] is None
    assert list(rows[0]) == list(rows[3])  # every row has every column


def test_all_stages_gives_one_row_per_finished_stage(sessions):
    rows = compare_rows(sessions[1:2], all_stages=True)
    assert [(r["stage"], r["configuration"]) for r in rows] == [(0, "Base"), (1, "Depth 2"), (2, "Depth 2 + Width 1:8")]
    assert [r[f"PPL [{PPL}]"] for r in rows] == [26.61, 30.5, 33.25]


def test_markdown(sessions):
    md = format_table(compare_table(sessions), "md")
    lines = md.splitlines()
    assert lines[0].startswith(f"| session | id | status | configuration | LoRA | quantization | {TQC}")
    assert f"PPL [{PPL}]" in lines[0] and f"PPL [{PPL2}]" in lines[0]
    assert set(lines[1]) <= set("|-:")
    assert "| dw |" in md and "| Depth 2 + Width 1:8 |" in md
    assert (
        "| 33.25 |" in md
        and "| 30.0 % |" in md
        and "| 990,000,000 |" in md
        and "| 3.00 GiB |" in md
        and "| 3.00 GiB |" in md
    )
    assert "N:M = N of every M" in md  # the convention is named with the numbers
    assert len([row for row in lines if row.startswith("| ")]) == 1 + len(sessions)


def test_csv(sessions):
    text = format_table(compare_table(sessions), "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4
    assert rows[1]["configuration"] == "Depth 2 + Width 1:8"
    assert float(rows[1][f"PPL [{PPL}]"]) == 33.25
    assert rows[1][TQC] == "0.3" and rows[0]["LoRA"] == ""
    assert int(rows[1]["nonzero params"]) == 990_000_000


def test_json(sessions):
    sessions[0].stages[0].metrics[0]["value"] = math.inf  # a diverged perplexity becomes null, not Infinity
    data = json.loads(format_table(compare_table(sessions), "json"))
    assert data["columns"][0] == "session" and len(data["rows"]) == 4
    assert data["rows"][0][f"PPL [{PPL}]"] is None
    assert data["rows"][2]["quantization"] == "GPTQ 4-bit g128 + EoRA r32"
    assert any("N:M" in n for n in data["notes"])
    with pytest.raises(ValueError):
        format_table(compare_table(sessions), "xlsx")


def test_headline(sessions):
    h = headline(sessions[1])
    assert h["configuration"] == "Depth 2 + Width 1:8" and h["perplexity"] == 33.25 and h["protocol"] == PPL
    assert h["triviaqa_closed"] == 0.30 and h["stages_done"] == 2 and h["params_nonzero"] == 990_000_000
    assert headline(sessions[3])["perplexity"] is None


# -- the commands ------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path, sessions):
    paths = []
    for s in sessions:
        paths.append(s.save(tmp_path / "runs" / s.title / "session.json"))
    (tmp_path / "runs" / "junk").mkdir()
    (tmp_path / "runs" / "junk" / "session.json").write_text('{"format": "frankenlab-session"')
    return tmp_path, paths


@pytest.mark.parametrize("fmt", ["md", "csv", "json"])
def test_compare_command_formats(saved, capsys, fmt):
    _, paths = saved
    rc = main(["compare", *map(str, paths[:3]), "--format", fmt])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Depth 2 + Width 1:8" in out and "GPTQ 4-bit g128 + EoRA r32" in out
    if fmt == "json":
        assert len(json.loads(out)["rows"]) == 3
    if fmt == "csv":
        assert len(list(csv.reader(io.StringIO(out)))) == 4


def test_compare_command_writes_a_file_and_reports_bad_inputs(saved, capsys, tmp_path):
    root, paths = saved
    target = tmp_path / "table.md"
    rc = main(["compare", str(paths[1]), str(root / "runs" / "junk"), "--format", "md", "-o", str(target)])
    err = capsys.readouterr().err
    assert rc == 1 and "skipped" in err and "truncated" in err
    assert "Depth 2 + Width 1:8" in target.read_text()


def test_compare_with_no_arguments_uses_the_default_places(saved, capsys, monkeypatch, tmp_path):
    root, _ = saved
    monkeypatch.chdir(root)
    monkeypatch.setenv("FRANKENLAB_SESSIONS", str(tmp_path / "nothing-here"))
    assert main(["compare", "--format", "csv"]) == 0  # a broken file in ./runs does not fail a listing
    out = capsys.readouterr().out
    assert len(list(csv.reader(io.StringIO(out)))) == 5


def test_sessions_command(saved, capsys):
    root, _ = saved
    assert main(["sessions", str(root / "runs"), "--format", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert len(items) == 5
    good = [i for i in items if i["error"] is None]
    assert [i["name"] for i in good] == ["failed", "full", "dw", "base"]  # newest first
    dw = next(i for i in good if i["name"] == "dw")
    assert dw["perplexity"] == 33.25 and dw["configuration"] == "Depth 2 + Width 1:8"
    assert main(["sessions", str(root / "runs")]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "dw" in out


def test_qa_columns_split_by_protocol_and_always_exist():
    plain = make("plain", [])
    plain.stages[0].metrics = _metrics(20.0)
    rows = compare_rows([plain])
    assert rows[0]["TriviaQA closed (acc)"] is None and rows[0]["TriviaQA open (acc)"] is None
    other = make("other", [])
    other.stages[0].metrics[1]["protocol"] = "triviaqa-closed-validation:500"
    rows = compare_rows([make("base", []), other])
    assert rows[0][TQC] == 0.42 and rows[0]["TriviaQA closed (acc) [triviaqa-closed-validation:500]"] is None
    assert rows[1][TQC] is None and rows[1]["TriviaQA closed (acc) [triviaqa-closed-validation:500]"] == 0.42


def test_sessions_command_prints_the_schema(capsys):
    assert main(["sessions", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"].startswith("frankenlab session") and "stages" in schema["properties"]


def test_sessions_save_copies_into_the_user_folder(saved, capsys, monkeypatch, tmp_path):
    _, paths = saved
    monkeypatch.setenv("FRANKENLAB_SESSIONS", str(tmp_path / "mine"))
    assert main(["sessions", "--save", str(paths[1].parent), "--name", "thesis dw"]) == 0
    assert "saved to" in capsys.readouterr().out
    (copy,) = (tmp_path / "mine").glob("*.json")
    assert copy.name.startswith("thesis-dw-")
    assert main(["sessions", "--format", "json", str(tmp_path / "mine")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "thesis dw"
    assert main(["sessions", "--save", str(tmp_path / "missing")]) == 2


def test_accuracies_carry_wilson_intervals_and_noise_is_marked():
    from frankenlab.evals.stats import wilson

    def qa(value, n):
        return [
            {
                "name": "triviaqa_closed",
                "value": value,
                "protocol": "triviaqa-closed-validation:200:first-line",
                "n": n,
                "correct": round(value * n),
                "ci95": list(wilson(round(value * n), n)),
            },
            {"name": "hellaswag_acc_norm", "value": value + 0.2, "protocol": "hellaswag-validation:500", "n": n},
        ]

    base, near, far = make("base", []), make("near", []), make("far", [])
    base.stages[0].metrics, near.stages[0].metrics, far.stages[0].metrics = qa(0.095, 200), qa(0.12, 200), qa(0.2, 200)
    table = compare_table([base, near, far])
    rows = table.as_dicts()
    ci = "TriviaQA closed 95 % CI [triviaqa-closed-validation:200:first-line]"
    assert [r[ci] for r in rows] == ["6.2-14.4 % ref", "8.2-17.2 % ≈", "15.0-26.1 %"]  # 20 % is outside [6.2, 14.4]
    # HellaSwag: an interval computed from n alone (no ci95 recorded), same marking
    hs = "HellaSwag acc_norm 95 % CI [hellaswag-validation:500]"
    assert rows[0][hs].endswith("ref") and rows[1][hs].endswith("≈") and not rows[2][hs].endswith("≈")
    assert rows[0]["HellaSwag acc_norm [hellaswag-validation:500]"] == pytest.approx(0.295)
    md = format_table(table, "md")
    assert "| 9.5 % | 6.2-14.4 % ref |" in md and "Wilson" in md
    # sessions recorded before intervals existed get no interval column
    assert not any("95 % CI" in c.title for c in compare_table([make("old", [])]).columns)
