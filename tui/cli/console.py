"""The one rich Console factory every command prints through.

On a terminal: rich's usual console, fitted to the terminal's width. Into a pipe or a file (a log,
`| grep`, `| less`, `-o FILE`): no hard wrapping and no truncation. A message stays on one line
however long its path is (so grep finds it), and a table is as wide as its content, whatever
$COLUMNS says (rich would otherwise wrap and cut everything at $COLUMNS or 80).

"Terminal" means the stream itself is a tty. FORCE_COLOR or TTY_COMPATIBLE (set by CI systems that
want colours in their logs) still give colours, through rich's own rules, but not a width: a log
is never wrapped.
"""

from __future__ import annotations

import shutil
from typing import IO

from rich.console import Console

# Width given to a console that is not a terminal: wider than any table or line a command prints,
# so rich never wraps or cuts; a table still takes only the width its content needs, and
# `soft_wrap` leaves text lines as they are (rich pads nothing to this width).
PIPE_WIDTH = 10_000


def is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def make_console(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A Console on stdout (or stderr, or `file`) following the rules above."""
    console = Console(stderr=stderr, file=file)
    if not piped(console):
        if console.width < 1:  # COLUMNS=0 says nothing: the terminal's own width (else 80), not zero
            console.width = shutil.get_terminal_size().columns
        return console
    console.width = PIPE_WIDTH
    console.soft_wrap = True
    return console


def piped(console: Console) -> bool:
    """Whether `console` writes to a pipe or a file rather than a terminal."""
    return not is_tty(console.file)
