"""Third-party noise goes to the log file; our warnings and real errors still reach the terminal."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import logging, sys, warnings
from frankenlab.tui import noise
log = noise.route()
import torch  # torch's own stderr handlers are diverted once it has been imported
logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
logging.getLogger("torch.utils._pytree").warning("<enum 'KernelPreference'> ... register_constant() is deprecated")
warnings.warn_explicit("`past_key_values` is deprecated", FutureWarning, "/venv/site-packages/transformers/x.py", 7)
warnings.warn_explicit("ours: check this", UserWarning, str(noise._ROOT / "evals" / "qa.py"), 3)
logging.getLogger("some.library").error("a real library error")
print("attached", noise.attach(sys.argv[1]))
logging.getLogger("torchao").warning("after attach")
"""


def test_third_party_noise_goes_to_the_log_not_the_terminal(tmp_path):
    log = tmp_path / "run" / "run.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    terminal = out.stdout + out.stderr
    for noise_line in ("Failed to load", "register_constant", "past_key_values", "after attach"):
        assert noise_line not in terminal
    assert "ours: check this" in terminal and "a real library error" in terminal  # not hidden
    text = log.read_text()
    for line in (
        "Failed to load /x/_C_mxfp8.so",
        "register_constant",
        "FutureWarning",
        "past_key_values",
        "a real library error",
        "after attach",
    ):
        assert line in text
    assert "ours: check this" not in text
