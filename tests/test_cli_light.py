"""Issue 14: commands that need no model never import torch/transformers; a missing model path is told
before anything heavy loads; `frankenlab sessions` reads well at 80 columns and as plain text in a pipe;
JSON errors say what they mean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from frankenlab.sessions.session import SessionError, loads_session

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ)
PROBE = """
import sys
from frankenlab.tui.cli.main import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
heavy = sorted(m for m in ("torch", "transformers", "textual") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), "RC=" + str(rc), file=sys.stderr)
"""


def _probe(*args, cwd=None):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=ENV, cwd=cwd, capture_output=True, text=True)
    last = out.stderr.strip().splitlines()[-1]
    return out, last


@pytest.mark.parametrize(
    "args",
    [
        ["recipes"],
        ["sessions"],
        ["--help"],
        ["run", "--help"],
        ["sessions", "--help"],
        ["--model", "/no/such/folder"],
        ["run", "depth2", "--model", "./missing.gguf"],
        ["compare", "/no/such/session.json"],
    ],
)
def test_light_commands_import_no_torch(args, tmp_path):
    out, last = _probe(*args, cwd=tmp_path)
    assert last.startswith("HEAVY= "), (args, last, out.stdout[-500:])
    assert "Traceback" not in out.stdout + out.stderr


def test_missing_model_path_is_one_line_exit_2(tmp_path):
    out, last = _probe("run", "depth2", "--model", "./missing.gguf", cwd=tmp_path)
    assert "RC=2" in last and "'./missing.gguf' does not exist" in out.stderr
    out, last = _probe("--model", "/no/such/folder", cwd=tmp_path)
    assert "RC=2" in last and "does not exist" in out.stderr


def test_recipes_lists_every_bundled_recipe(tmp_path):
    out, _ = _probe("recipes", cwd=tmp_path)
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert set(names) == {p.stem for p in (ROOT / "pipeline" / "recipes").glob("*.toml")}


def _sessions_folder(tmp_path) -> Path:
    from frankenlab.sessions.session import Session, StageRecord

    for i in range(2):
        st = StageRecord(
            1,
            "width",
            "Width 1:8",
            {"pattern": "1:8"},
            "done",
            metrics=[{"name": "perplexity", "value": 20.5 + i, "protocol": "wikitext2-concat-512:first32"}],
            params_count=134515008,
            params_nonzero=120000000,
        )
        Session(
            recipe={"name": f"a-rather-long-recipe-name-{i}", "stages": [{"kind": "width", "pattern": "1:8"}]},
            stages=[StageRecord(0, "baseline", status="done"), st],
            status="done",
        ).save(tmp_path / f"r{i}" / "session.json")
    return tmp_path


def test_sessions_piped_is_plain_text(tmp_path):
    folder = _sessions_folder(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "frankenlab.tui", "sessions", str(folder)],
        env=ENV,
        capture_output=True,
        text=True,
    )
    lines = out.stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["created", "name", "status"]
    assert len(lines) == 3 and all(len(line.split("\t")) == 9 for line in lines)
    assert "\x1b[" not in out.stdout and "━" not in out.stdout and "│" not in out.stdout
    assert "a-rather-long-recipe-name-0" in out.stdout and "134,515,008" in out.stdout


def test_sessions_table_fits_80_columns_without_strips(tmp_path):
    from rich.console import Console

    from frankenlab.tui.cli.sessions import sessions_table

    cols = (
        "created",
        "name",
        "status",
        "stages",
        "configuration",
        "perplexity",
        "TriviaQA c/o",
        "params (nonzero)",
        "path",
    )
    row = (
        "2026-12-02 16:35",
        "a-rather-long-recipe-name (0123456789ab)",
        "done",
        "2/2",
        "Depth 2 + Width 1:8",
        "20.50 (wikitext2-concat-512:first32)",
        "9.5% / -",
        "134,515,008 (120,000,000)",
        "/a/long/path/session.json",
    )
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(sessions_table(cols, [row], 80, "runs"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "20.50" in text and "perplexity: wikitext2-concat-512:first32" in text
    assert "Depth 2 +" in text and "a-rather-lon" in text  # not folded into 6-character strips
    assert "path" not in text.split("\n")[2]  # the path column goes first at 80 columns


def test_json_errors_say_what_they_mean():
    with pytest.raises(SessionError) as e:
        loads_session('{"a": 1,\n "b": "x\x01y", "c": 2}')
    msg = str(e.value)
    assert "at at" not in msg and "control character (code 0x01)" in msg and "truncated" not in msg
    with pytest.raises(SessionError) as e:
        loads_session('{"a": [1, 2')
    assert "truncated" in str(e.value) and "at at" not in str(e.value)


def test_model_settings_on_the_command_line_override_the_recipes():
    """`frankenlab --device cpu --dtype bfloat16 run r.toml` runs on those settings (the defaults, auto
    and off, keep the recipe's own); a dtype the recipe would refuse is refused the same way."""
    from frankenlab.evals.errors import RecipeError
    from frankenlab.pipeline.recipe import ModelSpec
    from frankenlab.tui.cli.main import build_parser
    from frankenlab.tui.cli.run import model_overrides

    recipe_model = ModelSpec(source="some/model", dtype="float32", device="cuda")
    args = build_parser().parse_args(["--device", "cpu", "--dtype", "bfloat16", "run", "r.toml"])
    assert model_overrides(recipe_model, args) == ModelSpec("some/model", "bfloat16", "cpu", False)
    args = build_parser().parse_args(["run", "r.toml", "--model", "other/model"])
    assert model_overrides(recipe_model, args) == ModelSpec("other/model", "float32", "cuda", False)
    args = build_parser().parse_args(["--trust-remote-code", "run", "r.toml"])
    assert model_overrides(recipe_model, args).trust_remote_code is True
    with pytest.raises(RecipeError, match="unknown dtype"):
        model_overrides(recipe_model, build_parser().parse_args(["--dtype", "int3", "run", "r.toml"]))


def test_a_bad_dtype_on_the_command_line_is_one_line(tmp_path, capsys):
    from frankenlab.tui.cli.main import main

    (tmp_path / "r.toml").write_text('name = "x"\n')
    assert main(["--dtype", "int3", "run", str(tmp_path / "r.toml"), "--out", str(tmp_path / "o")]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "unknown dtype 'int3'" in out[0], out
    assert not (tmp_path / "o").exists()
