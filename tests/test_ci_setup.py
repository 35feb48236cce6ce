"""Issue 14: `.ci/setup` says what it installs and roughly how long it takes, and hides the
editable-install warnings (run against a stand-in venv whose python only pretends to install)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$@" >> "$(dirname "$0")/calls.log"
if [[ " $* " == *" install "* ]]; then
  echo "SetuptoolsDeprecationWarning: editable installs via setup.py develop are deprecated" >&2
  echo "!!" >&2
  echo "        ********************************************************************************" >&2
  echo "        Please avoid running setup.py directly." >&2
fi
exit 0
"""


def test_setup_says_what_it_installs_and_hides_editable_warnings(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "setup")],
        env={**os.environ, "FRANKENLAB_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "installing frankenlab and its libraries" in text and "usually" in text and "ready after" in text
    assert "bundled model" in text
    assert "SetuptoolsDeprecationWarning" not in text and "setup.py" not in text and "!!" not in text
    assert "install -e" in (venv / "bin" / "calls.log").read_text()
