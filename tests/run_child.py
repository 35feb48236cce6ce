"""A real `frankenlab run` in a child process, held at the start of stage 2 so a test can kill it.

usage: python tests/run_child.py MODE MARKER -- <frankenlab arguments>
MODE "hang": stage 2 never proceeds (the test sends kill -9). MODE "wait-cancel": stage 2 waits
until the run's cancel flag is set (the test sends SIGTERM), then the run goes on and must stop.
The marker file is written once stage 1's record is saved and stage 2 has started.
"""

import sys
import time

from frankenlab.pipeline import events as ev
from frankenlab.tui.cli import run as runcmd

mode, marker = sys.argv[1], sys.argv[2]
args = sys.argv[sys.argv.index("--") + 1 :]
flags = {}
_orig_cancels = runcmd.ctrl_c_cancels


def _capture(console, verb="cancelling"):
    cancel, restore = _orig_cancels(console, verb)
    flags["cancel"] = cancel
    return cancel, restore


_orig_call = runcmd.ProgressView.__call__


def _call(self, e):
    _orig_call(self, e)
    if isinstance(e, ev.StageStarted) and e.stage == 2:
        with open(marker, "w") as f:
            f.write("stage 2 started\n")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if mode == "wait-cancel" and flags["cancel"].is_set():
                return
            time.sleep(0.05)


runcmd.ctrl_c_cancels = _capture
runcmd.ProgressView.__call__ = _call

from frankenlab.tui.cli.main import main  # noqa: E402

sys.exit(main(args))
