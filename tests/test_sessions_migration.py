"""Files written by the previous version still open: sessions and a sweep folder of schema version 2.

The fixtures under tests/fixtures/v2/ were recorded by running frankenlab at commit cf30342 (session
schema 2) on the tiny random LLaMA (tests/fixtures/v2/README.md): a finished run, a run cancelled at
its width stage, and a two-configuration sweep. Model weights are left out; paths inside read
`@ROOT@`, replaced by the folder each test copies them into.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from frankenlab.sessions import SCHEMA_VERSION, StageRecord, compare_rows, load_session
from frankenlab.sessions.session import loads_session, migrate_event_log
from frankenlab.sessions.sweep import load_record
from frankenlab.sessions.sweep.jobs import read_node
from frankenlab.sessions.sweep.results import sweep_sessions, write_results
from frankenlab.tui.cli.main import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v2"
THREE_DONE = [(0, "baseline", "done"), (1, "depth", "done"), (2, "width", "done")]


def copy_fixture(name: str, root: Path) -> Path:
    """tests/fixtures/v2/NAME copied into root/NAME, its `@ROOT@` paths pointing into root."""
    for src in (FIXTURES / name).rglob("*"):
        if src.is_file():
            dst = root / src.relative_to(FIXTURES)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(src.read_text().replace("@ROOT@", str(root)))
    return root / name


def raw(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_fixtures_are_version_2_files():
    assert SCHEMA_VERSION == 3
    for p in FIXTURES.rglob("session.json"):
        assert raw(p)["schema_version"] == 2, p
    cancelled = raw(FIXTURES / "cancelled" / "session.json")
    assert any(e["event"] == "RunFailed" and e.get("error_type") == "cancelled" for e in cancelled["events"])
    finished = raw(FIXTURES / "finished" / "session.json")
    assert all("summary" in e for e in finished["events"] if e["event"] == "StageFinished")


def test_a_finished_version_2_session_loads_migrated(tmp_path):
    run = copy_fixture("finished", tmp_path)
    old = raw(run / "session.json")
    s = load_session(run)
    assert s.schema_version == SCHEMA_VERSION and s.status == "done"
    assert all(isinstance(st, StageRecord) for st in s.stages)
    assert [(st.index, st.kind, st.status) for st in s.stages] == THREE_DONE
    for st, before in zip(s.stages, old["stages"], strict=True):  # stage records are untouched
        assert st.to_dict() == before
    assert s.stages[2].metric("perplexity", "wikitext2-concat-64:first4")["value"] == pytest.approx(423.9617971138241)
    assert s.stages[1].num_layers == 6 and s.stages[2].params["pattern"] == "2:4"
    assert s.artifact_path(2) == run / "stages" / "02-width"
    # the event log: StageFinished without the summary it copied from the record, the rest as it was
    finished = [e for e in s.events if e["event"] == "StageFinished"]
    assert [(e["stage"], e["kind"], e["status"]) for e in finished] == THREE_DONE
    assert not any("summary" in e or "error_type" in e for e in s.events)
    others = [e for e in old["events"] if e["event"] != "StageFinished"]
    assert [e for e in s.events if e["event"] != "StageFinished"] == others
    # saved again it is a version-3 file that loads to the same session
    s.save(tmp_path / "again.json")
    assert raw(tmp_path / "again.json")["schema_version"] == SCHEMA_VERSION
    assert load_session(tmp_path / "again.json").to_dict() == {**s.to_dict(), "updated": s.updated}


def test_a_cancelled_version_2_session_loads_as_cancelled(tmp_path):
    run = copy_fixture("cancelled", tmp_path)
    old = raw(run / "session.json")
    (failed,) = [e for e in old["events"] if e["event"] == "RunFailed"]
    s = load_session(run)
    assert s.status == "cancelled"
    assert [st.status for st in s.stages] == ["done", "done", "cancelled"]
    assert s.stages[2].error == "cancelled by the user; finished stages are kept"
    assert s.stages[1].metrics == old["stages"][1]["metrics"] and s.stages[1].metrics[0]["value"] > 0
    assert not any(e["event"] == "RunFailed" for e in s.events)
    (cancelled,) = [e for e in s.events if e["event"] == "RunCancelled"]
    assert cancelled == {
        "event": "RunCancelled",
        "stage": 2,
        "time": failed["time"],
        "message": "cancelled by the user; finished stages are kept",
    }
    assert [e["event"] for e in s.events][-2:] == ["RunCancelled", "RunFinished"]


def test_a_failed_run_keeps_its_failure_and_cause():
    events = [
        {"event": "RunFailed", "stage": 1, "time": 1.0, "message": "no data", "error_type": "failed", "cause": "input"},
        {"event": "RunFinished", "stage": 1, "time": 2.0, "status": "failed", "out_dir": "x"},
        {"event": "LogLine", "stage": -1, "time": 0.5, "message": "hello", "level": "info", "summary": "not a stage's"},
    ]
    assert migrate_event_log(events) == [
        {"event": "RunFailed", "stage": 1, "time": 1.0, "message": "no data", "cause": "input"},
        events[1],
        events[2],  # only StageFinished loses its summary
    ]
    d = raw(FIXTURES / "finished" / "session.json")
    d["events"] = events
    assert loads_session(json.dumps(d)).events[0] == migrate_event_log(events)[0]
    d["schema_version"] = 3  # a version-3 file is taken as it is
    assert loads_session(json.dumps(d)).events == events


def test_sessions_and_compare_commands_read_version_2_files(tmp_path, capsys):
    finished, cancelled = copy_fixture("finished", tmp_path), copy_fixture("cancelled", tmp_path)
    assert main(["sessions", str(tmp_path), "--format", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert len(items) == 2 and all(i["error"] is None for i in items)
    by_status = {i["status"]: i for i in items}
    assert set(by_status) == {"done", "cancelled"}
    assert by_status["done"]["perplexity"] == pytest.approx(423.9617971138241)
    assert main(["compare", str(finished), str(cancelled), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows == json.loads(json.dumps(compare_rows([load_session(finished), load_session(cancelled)])))
    assert len(rows) == 2


def test_a_version_2_sweep_folder_reads(tmp_path):
    out = copy_fixture("sweep", tmp_path)
    record = load_record(out)
    assert record["status"] == "done" and len(record["configs"]) == 2 and len(record["nodes"]) == 4
    for key in record["nodes"]:
        node = read_node(out, key)
        assert node is not None and node["status"] == "done", key  # finished: a rerun would reuse it
        assert StageRecord.from_dict(node["record"]).status == "done"
    record, sessions = sweep_sessions(out)
    assert [s.name for s in sessions] == ["width.pattern=1:8", "width.pattern=2:4"]
    for s, c in zip(sessions, record["configs"], strict=True):
        old = raw(out / c["session"])
        assert s.schema_version == SCHEMA_VERSION and s.status == "done"
        assert [st.extra["sweep_node"] for st in s.stages] == c["nodes"]
        assert [st.metrics for st in s.stages] == [st["metrics"] for st in old["stages"]]
        assert s.artifact_path(2).resolve() == out / "nodes" / c["nodes"][2] / "stages" / "02-width"
    assert sessions[1].stages[2].metric("perplexity")["value"] == pytest.approx(419.0872504085075)
    for key in record["nodes"]:  # each job's own session, as the job wrote it
        job = load_session(out / read_node(out, key)["session"])
        assert job.status == "done" and job.schema_version == SCHEMA_VERSION
    written = write_results(out)
    assert set(written) == {"table-4.1", "pareto"}  # no recovery stage: no table 4.2
    table = (out / "tables" / "table-4.1.md").read_text()
    assert "Width 1:8" in table and "Width 2:4" in table and "419.09" in table
