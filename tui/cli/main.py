"""The `frankenlab` command: the lab (no subcommand) or a headless subcommand.

Each subcommand lives in its own module under `tui/cli/` with `register(subparsers)`; the
lab itself is imported only when it opens, so headless commands never import Textual widgets.
Options several commands share are defined once (`tui/cli/options.py`); everything a command
prints goes through one console factory (`tui/cli/console.py`: no hard wrapping into a pipe).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from pathlib import Path

from frankenlab.tui import cli, noise
from frankenlab.tui.cli import options


def _quiet_libraries() -> None:
    """Third-party progress bars would tear a TUI and clutter logs (their warnings: `tui.noise`).

    Environment variables only: transformers and the hub read them when (if) they are imported, so a
    command that needs no model (recipes, sessions, --help) never imports torch or transformers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def model_ref_problem(ref: str | None) -> str | None:
    """A --model that names a local path that is not there, told before anything heavy loads
    (the same rules as pipeline.loading.resolve_source, which needs torch)."""
    if not ref or ref == "default":
        return None
    path = Path(ref).expanduser()
    if path.exists():
        return None
    if path.suffix == ".gguf":
        return f"GGUF file {ref!r} does not exist: check the path"
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        return (
            f"model path {ref!r} does not exist (expected an HF folder, a .gguf file, a hub id like "
            "org/name, or nothing for the bundled default)"
        )
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frankenlab",
        description="A terminal lab for compressing small LLaMA-architecture language models. "
        "With no subcommand, opens the lab.",
    )
    options.add(parser, "model", top=True)
    parser.add_argument("--session", default=None, help="reopen a saved session file in the lab")
    parser.add_argument("--recipe", default=None, help="start the lab with this recipe (TOML file or bundled name)")
    options.add(parser, "device", "dtype", "data_dir", "trust_remote_code", top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cli.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"frankenlab.tui.cli.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command; Ctrl-C before a command installs its own handling (during the seconds torch and
    transformers take to import) ends it with one line and exit 130, never a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("frankenlab: cancelled (Ctrl-C)", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = model_ref_problem(args.model)
    if problem:
        print(f"frankenlab: {problem}", file=sys.stderr)
        return 2
    if args.command is None and args.session:  # a session that cannot be read: one line and exit 2, no lab
        from frankenlab.sessions import SessionError, load_session

        try:
            load_session(args.session)
        except SessionError as exc:
            print(f"frankenlab: {exc}", file=sys.stderr)
            return 2
    noise.route(terminal=args.command is not None)  # third-party warnings and log lines to a log file
    if args.command is None:
        from frankenlab.tui.app import run_lab

        return run_lab(args) or 0
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
