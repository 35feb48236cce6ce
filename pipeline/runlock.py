"""Who owns a run folder, and whether that process is still alive.

A run records its owner (pid, host, process start time) in the session, and holds a lock file in
its folder while it runs. A reader that finds a session still marked "running" asks `owner_alive`:
when the owning process is gone (kill -9, a power cut, a closed laptop) the session is read as
"interrupted" rather than running forever. The start time tells a reused pid from the original
process. A second run into a live run's folder is refused; a lock left by a dead process is taken
over, with a message saying so. Plain files only: no package, works on every POSIX machine
(without /proc the start time is not checked and a reused pid reads as alive).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.atomic import atomic_write_text

LOCK_FILE = ".frankenlab-run.lock"
_IMPORTED = time.time()


class RunFolderBusy(RecipeError):
    """Another live run owns the folder; the message says which and what to do."""


def safe_slug(name: str, fallback: str = "run", limit: int = 60) -> str:
    """A name usable as one folder name: no separators, no '..', no leading dot or dash.

    "../../etc/x" -> "etc-x", "/abs/path" -> "abs-path"; the recipe keeps its real name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name))
    slug = re.sub(r"\.{2,}", "-", slug).strip("-.")[:limit].strip("-.")
    return slug or fallback


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def process_start_time(pid: int) -> float | None:
    """Unix time at which process `pid` started (Linux /proc), or None where it cannot be known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    boot = _boot_time()
    if boot is None:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    try:
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None


def process_identity() -> dict:
    """This process as a session's `owner`: {"pid", "host", "started"}."""
    pid = os.getpid()
    started = process_start_time(pid)
    return {"pid": pid, "host": socket.gethostname(), "started": round(started if started else _IMPORTED, 2)}


def owner_alive(owner: dict | None) -> bool | None:
    """True: the owner is running; False: it is gone; None: cannot tell (another host, no owner)."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    except OSError:
        return None
    started, recorded = process_start_time(pid), owner.get("started")
    if started is not None and isinstance(recorded, (int, float)) and abs(started - recorded) > 2.0:
        return False  # the pid was reused by another process
    if _zombie(pid):
        return False
    return True


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def describe_owner(owner: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started") or 0))
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {when}"


class RunLock:
    """The lock file of a run folder (or, with what="sweep", of a sweep folder: `sessions.sweep.run`).
    `acquire()` returns a message when it took over a stale lock."""

    def __init__(self, folder: str | Path, what: str = "run"):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_FILE
        self.owner = process_identity()
        self.held = False

    def acquire(self) -> str | None:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.owner)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over(text)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.held = True
        return None

    def _take_over(self, text: str) -> str:
        try:
            other = json.loads(self.path.read_text())
        except (OSError, ValueError):
            other = None
        if (
            isinstance(other, dict)
            and other.get("pid") == self.owner["pid"]
            and other.get("host") == self.owner["host"]
        ):
            raise RunFolderBusy(
                f"{self.folder} is already in use by another {self.what} of this process: "
                "choose another folder (--out DIR)"
            )
        alive = owner_alive(other)
        if alive is None and isinstance(other, dict):
            raise RunFolderBusy(
                f"{self.folder} is in use by a {self.what} on another machine ({describe_owner(other)}): "
                f"choose another folder (--out DIR), or delete {self.path} if that {self.what} is gone"
            )
        if alive:
            raise RunFolderBusy(
                f"{self.folder} is in use by a live {self.what} ({describe_owner(other)}): wait for it "
                "to finish, or choose another folder (--out DIR)"
            )
        atomic_write_text(self.path, text)
        self.held = True
        who = describe_owner(other) if isinstance(other, dict) else "an unreadable lock file"
        kept = "stages" if self.what == "run" else "nodes"
        return (
            f"took over the {self.what} folder from a {self.what} that is gone ({who}); "
            f"its finished {kept} stay on disk"
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError, AttributeError):
            pass
