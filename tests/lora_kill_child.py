"""A real `frankenlab run` in a child process that hangs right after a LoRA checkpoint, so a test can kill -9 it.

usage: python tests/lora_kill_child.py MARKER STEP -- <frankenlab arguments>
Once the LoRA stage has saved its checkpoint at step >= STEP, the marker file is written and the
process sleeps (the test sends SIGKILL).
"""

import sys
import time

from frankenlab.pipeline import lora_progress

marker, at = sys.argv[1], int(sys.argv[2])
args = sys.argv[sys.argv.index("--") + 1 :]
_save = lora_progress.save_checkpoint


def _save_then_hang(path, state):
    _save(path, state)
    if state["step"] >= at:
        with open(marker, "w") as f:
            f.write(f"checkpoint at step {state['step']}\n")
        time.sleep(600)  # killed here


lora_progress.save_checkpoint = _save_then_hang

from frankenlab.tui.cli.main import main  # noqa: E402

sys.exit(main(args))
