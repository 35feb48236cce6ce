"""Issue 24: an option several commands share is defined once (one flag, one dest, one help text),
given before or after the subcommand; output into a pipe or a file is never hard-wrapped or cut
(a long error stays on one line, a table keeps every cell whole), while a terminal still gets
output fitted to its width."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from frankenlab.tui.cli import options
from frankenlab.tui.cli.console import PIPE_WIDTH, make_console
from frankenlab.tui.cli.main import build_parser, main

LONG = "a-session-name-long-enough-that-eighty-columns-would-cut-or-fold-it-somewhere-in-the-middle-xyz"
DEEP = "/".join(["a-rather-deep-folder-name"] * 5)  # a path well over 80 columns


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    return {**env, "COLUMNS": "80", **extra}


def _cli(*args, cwd) -> subprocess.CompletedProcess:
    """`frankenlab ARGS` with stdout and stderr into pipes, COLUMNS=80 as a terminal would set it."""
    return subprocess.run(
        [sys.executable, "-m", "frankenlab.tui", *args],
        env=_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
    )


@pytest.fixture(autouse=True)
def _plain_terminal_rules(monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "80")


# -- one definition per shared option --------------------------------------------------------------
def _parsers():
    top = build_parser()
    yield "frankenlab", top
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    yield from sub.choices.items()


def test_every_shared_option_comes_from_its_one_definition():
    where: dict[str, set[str]] = {}
    for command, parser in _parsers():
        for action in parser._actions:
            shared = [options.BY_FLAG[f] for f in action.option_strings if f in options.BY_FLAG]
            if action.dest in options.OPTIONS:  # a shared dest under another flag would be a second definition
                assert action.option_strings == [options.OPTIONS[action.dest].flag], (command, action)
            if not shared:
                continue
            (o,) = shared
            assert getattr(action, "shared", None) is o, f"{command} {o.flag} is not defined by options.add"
            assert action.option_strings == [o.flag] and action.dest == o.dest, (command, action)
            assert action.help.startswith(o.help), (command, action.help)
            where.setdefault(o.flag, set()).add(command)
    assert where["--model"] == {"frankenlab", "run", "eval", "memory", "replay", "sweep", "plan"}
    assert where["--data-dir"] == {"frankenlab", "run", "eval", "replay", "sweep", "plan"}
    assert where["--device"] == where["--dtype"] == {"frankenlab", "eval", "memory", "replay", "plan"}
    assert where["--trust-remote-code"] == {"frankenlab", "eval", "plan"}
    assert where["--out"] == {"run", "replay", "sweep", "plan"}
    assert where["--no-save-models"] == {"run", "replay"}
    assert where["--format"] == {"compare", "sessions"}


def test_help_says_what_leaving_an_option_out_means_per_command():
    helps = {}
    for command, parser in _parsers():
        for action in parser._actions:
            if "--model" in action.option_strings:
                helps[command] = action.help
    assert "bundled" in helps["frankenlab"] and "bundled" in helps["eval"] and "bundled" in helps["memory"]
    assert "the recipe's model" in helps["run"] and "the session's" in helps["replay"]
    assert "base recipe's model" in helps["sweep"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model", "X", "run", "r.toml"], {"model": "X"}),
        (["run", "r.toml", "--model", "X"], {"model": "X"}),
        (["--model", "A", "run", "r.toml", "--model", "B"], {"model": "B"}),  # the subcommand's wins
        (["--data-dir", "D", "sweep", "s", "--out", "o"], {"data_dir": "D", "model": None}),
        (["sweep", "s", "--out", "o", "--data-dir", "D"], {"data_dir": "D"}),
        (["--device", "cpu", "eval"], {"device": "cpu", "dtype": "auto"}),
        (["eval", "--device", "cpu", "--dtype", "bfloat16"], {"device": "cpu", "dtype": "bfloat16"}),
        (["--trust-remote-code", "eval"], {"trust_remote_code": True}),
        (["eval", "--trust-remote-code"], {"trust_remote_code": True}),
        (["eval"], {"model": None, "device": "auto", "dtype": "auto", "trust_remote_code": False, "data_dir": None}),
        (["--dtype", "float16", "memory"], {"dtype": "float16"}),
        (["memory", "--dtype", "float16", "--model", "M"], {"dtype": "float16", "model": "M"}),
        (["replay", "s.json"], {"device": "auto", "dtype": "auto", "out": None, "no_save_models": False}),
        (["replay", "s.json", "--device", "cpu", "--no-save-models"], {"device": "cpu", "no_save_models": True}),
        (["compare", "--format", "csv"], {"fmt": "csv"}),
        (["sessions"], {"fmt": None}),
        ([], {"model": None, "device": "auto", "dtype": "auto", "data_dir": None, "trust_remote_code": False}),
    ],
)
def test_shared_options_parse_before_or_after_the_subcommand(argv, expected):
    args = vars(build_parser().parse_args(argv))
    assert {k: args.get(k, "<missing>") for k in expected} == expected
    old = {
        f"{c}_{o}" for c in ("run", "eval", "mem", "replay", "sweep") for o in ("model", "data_dir", "device", "dtype")
    }
    assert not old & set(args), args  # the per-command copies are gone


def test_sweep_still_requires_out(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "demo"])
    assert "--out" in capsys.readouterr().err


def test_missing_model_after_the_subcommand_is_caught_before_loading(capsys):
    for argv in (["eval", "--model", "./nope.gguf"], ["--model", "./nope.gguf", "memory"]):
        assert main(argv) == 2
        assert "'./nope.gguf' does not exist" in capsys.readouterr().err


# -- output into pipes and files -------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_factory_wraps_on_a_terminal_only(monkeypatch):
    message = "error: " + " ".join(f"word{i}" for i in range(60))
    tty = _Tty()
    make_console(file=tty).print(message)
    lines = tty.getvalue().splitlines()
    assert len(lines) > 1 and max(len(line) for line in lines) <= 80  # today's behaviour: fit the terminal

    for force in (None, "1"):  # a CI log asking for colours is still a log
        if force:
            monkeypatch.setenv("FORCE_COLOR", force)
        pipe = io.StringIO()
        console = make_console(file=pipe)
        console.print(message)
        assert console.width == PIPE_WIDTH
        assert len(pipe.getvalue().splitlines()) == 1 and "word59" in pipe.getvalue()


def test_console_factory_keeps_table_cells_whole_in_a_file():
    from rich.table import Table

    table = Table("name", "value")
    table.add_row(LONG, "1.0")
    f = io.StringIO()
    make_console(file=f).print(table)
    assert LONG in f.getvalue() and "…" not in f.getvalue()


def test_long_recipe_error_is_one_line_in_a_pipe(tmp_path):
    missing = f"{tmp_path}/{DEEP}/no-such-recipe.toml"
    out = _cli("run", missing, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "does not exist" in line]
    assert len(lines) == 1 and missing in lines[0] and lines[0].startswith("recipe error:"), out.stdout
    assert "bundled recipes:" in lines[0] and "Traceback" not in out.stderr


def test_long_recipe_error_is_one_line_in_process(tmp_path, capsys):
    missing = f"{tmp_path}/{DEEP}/no-such-recipe.toml"
    assert main(["run", missing]) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and missing in lines[0]


def test_long_errors_on_stderr_are_one_line(tmp_path):
    missing = f"{tmp_path}/{DEEP}/session.json"
    out = _cli("compare", missing, cwd=tmp_path)
    assert out.returncode == 2
    assert any(missing in line and line.startswith("skipped:") for line in out.stderr.splitlines()), out.stderr
    out = _cli("sessions", f"{tmp_path}/{DEEP}", cwd=tmp_path)
    assert f"no sessions found in {tmp_path}/{DEEP}" in out.stdout.splitlines(), out.stdout


def _long_named_session(tmp_path) -> Path:
    from frankenlab.sessions.session import Session, StageRecord

    stage = StageRecord(
        1,
        "width",
        "Width 1:8",
        {"pattern": "1:8"},
        "done",
        metrics=[{"name": "perplexity", "value": 20.5, "protocol": "wikitext2-concat-512:first32"}],
        params_count=134515008,
        params_nonzero=120000000,
    )
    folder = tmp_path / "runs"
    Session(
        recipe={"name": LONG, "stages": [{"kind": "width", "pattern": "1:8"}]},
        stages=[StageRecord(0, "baseline", status="done"), stage],
        status="done",
    ).save(folder / "r0" / "session.json")
    return folder


def test_sessions_prints_a_long_name_whole_in_a_pipe(tmp_path):
    folder = _long_named_session(tmp_path)
    out = _cli("sessions", str(folder), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = [line for line in out.stdout.splitlines() if LONG in line]
    assert row.split("\t")[1].startswith(LONG + " (") and "…" not in out.stdout


def test_sessions_prints_a_long_name_whole_in_process(tmp_path, capsys):
    folder = _long_named_session(tmp_path)
    assert main(["sessions", str(folder)]) == 0
    text = capsys.readouterr().out
    assert any(line.split("\t")[1].startswith(LONG) for line in text.splitlines()[1:]), text


def test_compare_table_into_a_pipe_and_a_file_keeps_the_name_whole(tmp_path, capsys):
    folder = _long_named_session(tmp_path)
    assert main(["compare", str(folder / "r0"), "--format", "table"]) == 0
    text = capsys.readouterr().out
    assert any(LONG in line for line in text.splitlines()) and "…" not in text, text
    target = tmp_path / "table.txt"
    assert main(["compare", str(folder / "r0"), "--format", "table", "-o", str(target)]) == 0
    assert LONG in target.read_text() and "…" not in target.read_text()


def test_recipes_and_memory_targets_are_not_cut_in_a_pipe(tmp_path):
    import frankenlab.pipeline
    from frankenlab.evals import toml

    out = _cli("recipes", cwd=tmp_path)
    assert out.returncode == 0 and "…" not in out.stdout
    for path in (Path(frankenlab.pipeline.__file__).parent / "recipes").glob("*.toml"):
        description = toml.loads(path.read_text())["description"]
        assert any(line.startswith(path.stem + " ") and line.endswith(description) for line in out.stdout.splitlines())
    from frankenlab.pipeline.targets import load_targets

    out = _cli("memory", "--list-targets", cwd=tmp_path)
    assert out.returncode == 0 and "…" not in out.stdout
    lines = out.stdout.splitlines()
    for name, target in load_targets().items():  # one row each, label whole
        assert any(f" {name} " in line and target.label in line for line in lines), (name, out.stdout)
