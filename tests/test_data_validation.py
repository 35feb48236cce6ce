"""Issue 25, cases 11-16, 24 and 25: data rows are validated (file and line named, exit 2, before any
weights load), numbers on non-standard data say so, echo hits are counted, and a few inputs that
used to start the wrong work are refused."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from frankenlab.evals import data as evdata
from frankenlab.evals import data_checks
from frankenlab.evals.errors import DataError, RecipeError
from frankenlab.evals.generate import Generation
from frankenlab.evals.qa import QAItem, QAResult, score
from frankenlab.tui.cli.main import main

WIKI = "wikitext2/wikitext-2-raw-v1-test.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def no_model_load(monkeypatch):
    """Any attempt to load weights fails the test: the problem must be found before."""

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the data was checked")

    monkeypatch.setattr("frankenlab.pipeline.runner.load_model", refuse)  # first: importing it binds the real one
    monkeypatch.setattr("frankenlab.pipeline.loading.load_model", refuse)


def one_line_error(out: str) -> str:
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, out
    return lines[0]


# -- case 11 and 25: WikiText rows with the wrong field, or a text that is not a string ---------------------


@pytest.mark.parametrize(
    "row, says",
    [({"body": "some text"}, 'no "text" field'), ({"text": 12345}, '"text" must be a string, got 12345')],
)
def test_wikitext_rows_are_validated_with_file_and_line(tmp_path, row, says):
    f = write_jsonl(tmp_path / WIKI, [{"text": "fine"}, {"text": ""}, row])
    with pytest.raises(DataError) as e:
        evdata.load_texts("wikitext2", data_dir=tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: ") and says in msg and "\n" not in msg


@pytest.mark.parametrize("row", [{"body": "some text"}, {"text": 12345}])
def test_eval_refuses_bad_wikitext_rows_before_loading(tmp_path, row, monkeypatch, capsys):
    write_jsonl(tmp_path / WIKI, [row])
    no_model_load(monkeypatch)
    rc = main(["eval", "--ppl", "wikitext2-concat-32", "--limit", "1", "--data-dir", str(tmp_path)])
    line = one_line_error(capsys.readouterr().out)
    assert rc == 2 and f"{tmp_path / WIKI}:1:" in line


def test_a_run_refuses_bad_rows_in_its_preflight(tmp_path, tiny_model_dir, monkeypatch):
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions import record_run

    write_jsonl(tmp_path / "data" / WIKI, [{"text": "ok"}] * 3 + [{"text": ["a", "list"]}])
    no_model_load(monkeypatch)
    recipe = Recipe.loads(
        f'name = "v"\n[model]\nsource = "{tiny_model_dir}"\n[evaluation]\nperplexity = ["wikitext2-concat-32"]\n'
    )
    session = record_run(recipe, tmp_path / "run", data_dir=tmp_path / "data")
    assert session.status == "failed"
    assert f"{tmp_path / 'data' / WIKI}:4:" in session.stages[0].error


# -- case 12: aliases must be a list ----------------------------------------------------------------------


def test_triviaqa_aliases_must_be_a_list(tmp_path):
    from frankenlab.evals.qa import load_items

    f = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question": "2 + 2?", "answer": "4", "aliases": ["4", "four"]},
            {"question": "2 + 2?", "answer": "4", "aliases": "four"},
        ],
    )
    with pytest.raises(DataError) as e:
        load_items("closed", 2, path=f)
    assert str(e.value).startswith(f"{f}:2: ") and '"aliases" must be a list of strings' in str(e.value)
    write_jsonl(f, [{"question": 5, "answer": "4"}])
    with pytest.raises(DataError, match=r":1: .*question"):
        load_items("closed", 1, path=f)


def test_hellaswag_and_nq_rows_are_validated(tmp_path):
    from frankenlab.evals.hellaswag import load_items as hs_items

    good = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1, "activity_label": "x"}
    f = tmp_path / "hellaswag" / "hellaswag_val_10042.jsonl.gz"
    f.parent.mkdir()
    with gzip.open(f, "wt") as out:
        out.write(json.dumps(good) + "\n" + json.dumps({**good, "endings": "abcd"}) + "\n")
    with pytest.raises(DataError, match=r"hellaswag_val_10042.jsonl.gz:2: .*endings"):
        hs_items(2, data_dir=tmp_path)
    nq = write_jsonl(tmp_path / "nq.jsonl", [{"question": "q", "answers": "a", "ctxs": [{"text": "t"}]}])
    with pytest.raises(DataError, match=r"nq.jsonl:1: .*answers"):
        evdata.load_dataset_records("nq-open", path=nq)


# -- case 24: corrupt calibration data names its file -------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "gz", "not-an-object"])
def test_corrupt_calibration_data_names_the_file(tmp_path, kind, tiny_model_dir):
    from transformers import AutoTokenizer

    from frankenlab.pipeline.calibration import CalibrationConfig, calibration_ids

    if kind == "gz":
        f = tmp_path / "c4" / "c4-en-train-first1000.jsonl.gz"
        f.parent.mkdir()
        f.write_bytes(b"\x1f\x8b\x08\x00garbage that is no deflate stream" * 10)
        cfg = CalibrationConfig(dataset=str(f), samples=2, seq_len=16)
    else:
        f = tmp_path / "c4" / "c4-en-train-first1000.jsonl"
        f.parent.mkdir()
        body = b'{"text": "ok"}\n' + (b"\xff\xfe\x00garbage\x80\n" if kind == "binary" else b'["a list"]\n')
        f.write_bytes(body)
        cfg = CalibrationConfig(samples=2, seq_len=16)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError) as e:
        calibration_ids(tok, cfg, data_dir=tmp_path)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_calibration_rows_with_non_string_text(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from frankenlab.pipeline.calibration import CalibrationConfig, calibration_ids

    f = write_jsonl(tmp_path / WIKI, [{"text": "a b c"}, {"text": None}])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError, match=rf"^{f}:2: "):
        calibration_ids(tok, CalibrationConfig(dataset="wikitext2", samples=1, seq_len=8), data_dir=tmp_path)


# -- case 13: an empty recipe, eval with nothing to do, COLUMNS=0 -------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_recipe_is_refused(tmp_path, text, capsys, monkeypatch):
    from frankenlab.pipeline.recipe import Recipe

    f = tmp_path / "empty.toml"
    f.write_text(text)
    with pytest.raises(RecipeError, match="empty"):
        Recipe.load(f)
    no_model_load(monkeypatch)
    assert main(["run", str(f), "--out", str(tmp_path / "out")]) == 2
    assert "empty" in one_line_error(capsys.readouterr().out)


def test_eval_with_only_zero_counts_has_nothing_to_do(monkeypatch, capsys):
    no_model_load(monkeypatch)
    assert main(["eval", "--triviaqa-closed", "0"]) == 2
    assert "nothing to evaluate" in one_line_error(capsys.readouterr().out)
    assert main(["eval", "--hellaswag", "0", "--triviaqa-open", "0"]) == 2
    capsys.readouterr()


def test_recipes_listing_with_columns_zero(monkeypatch, capsys):
    from frankenlab.pipeline.recipe import bundled_recipes
    from frankenlab.tui.cli import console

    monkeypatch.setattr(console, "is_tty", lambda stream: True)  # a terminal that says it has 0 columns
    monkeypatch.setenv("COLUMNS", "0")
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in bundled_recipes():
        assert name in out


# -- case 14: a replay with nothing to compare says so -------------------------------------------------------


def test_replay_with_nothing_to_compare_says_so(tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys):
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions import load_session, record_run

    monkeypatch.setenv("FRANKENLAB_CACHE", str(tmp_path / "cache"))
    recipe = Recipe.loads(f"""
name = "tiny-d"
[model]
source = "{tiny_model_dir}"
device = "cpu"
dtype = "float32"
[evaluation]
ppl_limit = 2
perplexity = ["wikitext2-concat-32"]
samples = false
[[stages]]
kind = "depth"
k = 1
[[stages]]
kind = "depth"
k = 1
""")
    saved = record_run(recipe, tmp_path / "orig", data_dir=data_dir)
    assert saved.status == "done"
    s = load_session(saved.path)
    s.stages[2].status, s.stages[2].metrics = "failed", []  # the stage to retry never finished
    for attr in ("params_count", "params_nonzero", "num_layers"):
        setattr(s.stages[2], attr, None)
    path = s.save(tmp_path / "edited" / "session.json")
    rc = main(["replay", str(path), "--from-stage", "2", "--out", str(tmp_path / "again"), "--no-save-models"])
    out = capsys.readouterr().out
    assert "within 1 %" not in out and "nothing to compare" in out
    assert rc == 1
    from types import SimpleNamespace

    from frankenlab.tui.lab_state import replay_verdict

    text, level = replay_verdict(SimpleNamespace(ok=True, diffs=[], flagged=[], tolerance=0.01))
    assert "nothing to compare" in text and level == "warning"


# -- case 15: non-standard data is named in the protocol label ------------------------------------------------


def test_protocol_label_names_non_standard_data(tiny, data_dir, tmp_path, monkeypatch):
    from frankenlab.evals.perplexity import perplexity

    std = perplexity(tiny.model, tiny.tokenizer, "wikitext2-concat-32", data_dir=data_dir, limit=1)
    assert std.protocol == "wikitext2-concat-32:first1"
    rows = [json.loads(x) for x in (data_dir / WIKI).read_text().splitlines()[:200]]
    f = write_jsonl(tmp_path / WIKI, rows)
    import hashlib

    digest = hashlib.sha256(f.read_bytes()).hexdigest()[:8]
    hashed = []
    real = data_checks._sha256_file
    monkeypatch.setattr(data_checks, "_sha256_file", lambda p: hashed.append(p) or real(p))
    other = perplexity(tiny.model, tiny.tokenizer, "wikitext2-concat-32", data_dir=tmp_path, limit=1)
    assert other.protocol == f"wikitext2-concat-32:first1@sha256:{digest}"
    assert other.value == pytest.approx(std.value)  # same first window: same number, other label
    perplexity(tiny.model, tiny.tokenizer, "wikitext2-concat-32", data_dir=tmp_path, limit=1)
    assert hashed == [f]  # cached per (path, size, mtime)
    # a copy of the standard file elsewhere is still the standard data
    shutil.copy(data_dir / WIKI, f)
    copy = perplexity(tiny.model, tiny.tokenizer, "wikitext2-concat-32", data_dir=tmp_path, limit=1)
    assert copy.protocol == "wikitext2-concat-32:first1"


def test_qa_label_names_non_standard_questions(tiny, tmp_path):
    from frankenlab.evals.qa import run_qa

    f = write_jsonl(
        tmp_path / "triviaqa" / "triviaqa_validation_2000.jsonl",
        [{"question": "Capital of France?", "answer": "Paris", "aliases": ["Paris"]}] * 3,
    )
    r = run_qa(tiny.model, tiny.tokenizer, "closed", 2, data_dir=tmp_path, max_new_tokens=2)
    assert r.protocol.startswith("triviaqa-closed-validation:2:first-line@sha256:")
    r = run_qa(tiny.model, tiny.tokenizer, "closed", 2, path=f, max_new_tokens=2)
    assert "@sha256:" in r.protocol


# -- case 16: echo hits ----------------------------------------------------------------------------------------

ECHO_ITEMS = [
    QAItem(0, "Which island group became known as The Friendly Islands?", ("Tonga", "The Friendly Islands")),
    QAItem(1, "Which island group became known as The Friendly Islands?", ("Tonga", "The Friendly Islands")),
    QAItem(2, "Which island group became known as The Friendly Islands?", ("Tonga", "The Friendly Islands")),
    QAItem(3, "Capital of France?", ("Paris",)),
    QAItem(4, "Largest planet?", ("Jupiter",)),
]
ECHO_GENS = [
    Generation("", " The Friendly Islands is a group\nmore", 8),  # echoes the question: only an echo hit
    Generation("", " Tonga", 2),  # a real answer
    Generation("", " Tonga, the Friendly Islands", 6),  # holds the echo and the real answer: not an echo hit
    Generation("", " Paris", 2),
    Generation("", " Saturn", 2),
]


@pytest.mark.parametrize("match", ["first-line", "thesis"])
def test_every_qa_result_counts_its_echo_hits(match):
    records, acc, _, _ = score(ECHO_ITEMS, ECHO_GENS, match)
    assert acc == 0.8  # the existing protocols keep their meaning: the echo still counts
    assert [r["echo"] for r in records] == [True, False, False, False, False]
    res = QAResult("closed", "p", acc, 0.0, 5, 1.0, "s", {}, records, match)
    m = res.metric("triviaqa_closed")
    assert m["echo_hits"] == 1 and m["value"] == 0.8


def test_noecho_protocol_does_not_count_echo_hits():
    first, acc_first, _, _ = score(ECHO_ITEMS, ECHO_GENS, "first-line")
    noecho, acc, em, rules = score(ECHO_ITEMS, ECHO_GENS, "first-line-noecho")
    assert [r["correct"] for r in noecho] == [False, True, True, True, False]
    assert acc == pytest.approx(acc_first - 1 / 5)
    assert [r["echo"] for r in noecho] == [True, False, False, False, False]
    m = QAResult("closed", "p", acc, em, 5, 1.0, "s", rules, noecho, "first-line-noecho").metric("x")
    assert m["echo_hits"] == 1 and m["correct"] == 3 and m["match"] == "first-line-noecho"
    assert sum(rules.values()) == 5 and rules["none"] == 2


def test_noecho_is_a_named_protocol_everywhere():
    from frankenlab.evals.config import from_dict
    from frankenlab.evals.matching import MATCH_PROTOCOLS, answer_text
    from frankenlab.evals.qa import protocol_name
    from frankenlab.evals.suite import EvalConfig

    assert "first-line-noecho" in MATCH_PROTOCOLS
    assert answer_text(" a\nb", "first-line-noecho") == "a"
    assert from_dict(EvalConfig, {"match": "first-line-noecho"}, "e").match == "first-line-noecho"
    assert protocol_name("closed", 10, 0, False, 100, match="first-line-noecho").endswith(":first-line-noecho")


def test_the_shared_data_passes_every_row_check_and_keeps_its_labels(data_dir):
    for name in ("wikitext2", "c4", "triviaqa", "triviaqa-train", "hellaswag", "nq-open", "wiki"):
        evdata.check_dataset(name, data_dir=data_dir)
        assert evdata.data_label(name, str(data_dir / evdata.DATASETS[name].relpath)) == ""
    assert evdata.data_label("wikitext2", "hub:wikitext") == ""


def test_eval_cli_offers_every_match_protocol_prints_echo_hits_and_jobs_when_piped(tiny_model_dir, data_dir, capsys):
    from frankenlab.evals.matching import MATCH_PROTOCOLS
    from frankenlab.tui.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    match = next(a for a in sub.choices["eval"]._actions if a.dest == "match")
    assert tuple(match.choices) == MATCH_PROTOCOLS
    args = ["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--data-dir", str(data_dir)]
    args += ["--ppl", "wikitext2-concat-32", "--limit", "1", "--triviaqa-closed", "2", "--match", "first-line-noecho"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "perplexity wikitext2-concat-32 ..." in out and "triviaqa_closed (2 questions) ..." in out  # piped
    assert "echo hit(s)" in out and "triviaqa-closed-validation:2:first-line-noecho" in out
