"""Who can use the Ray instance a sweep starts: only holders of its token.

The local instance that `frankenlab sweep --ray` starts listens on every interface, so the project
starts it with `RAY_AUTH_MODE=token` whatever Ray's default or the caller's environment says (Ray then
writes a token to ~/.ray/auth_token when there is none). The slow test starts one in a child process
and connects to it from others: refused without the token (with the one-line hint on what to set),
accepted with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from frankenlab.evals import toml
from tests.conftest import ROOT


class RecordingRay(types.ModuleType):
    """Records RAY_AUTH_MODE as `ray.init` sees it. Like Ray 2.59 and newer, a new local instance turns
    token authentication on while RAY_AUTH_MODE is unset (`old`: like Ray before it, it does not)."""

    def __init__(self, fail: str = "", old: bool = False):
        super().__init__("ray")
        self.fail, self.old, self.seen, self.shut = fail, old, [], False
        self.__version__ = "2.50.0" if old else "2.60.0"

    def is_initialized(self):
        return not self.shut and bool(self.seen)

    def init(self, **kwargs):
        self.seen.append((kwargs.get("address"), os.environ.get("RAY_AUTH_MODE")))
        if self.fail:
            raise ConnectionError(self.fail)
        if not kwargs.get("address") and "RAY_AUTH_MODE" not in os.environ and not self.old:
            os.environ["RAY_AUTH_MODE"] = "token"

    def shutdown(self):
        self.shut = True

    def cluster_resources(self):
        return {"CPU": 2.0}

    def remote(self, fn):
        return types.SimpleNamespace(options=lambda **kw: types.SimpleNamespace(remote=None))


def unset_auth_mode(monkeypatch):
    """RAY_AUTH_MODE unset for the test and as it was afterwards (delenv alone does not restore an absent one)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "restored-after-the-test")
    monkeypatch.delenv("RAY_AUTH_MODE")


@pytest.mark.parametrize("callers", [None, "disabled", "token"])
def test_the_local_instance_is_started_with_token_authentication(monkeypatch, callers):
    from frankenlab.sessions.sweep.executors import RayExecutor

    if callers is None:
        unset_auth_mode(monkeypatch)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", callers)  # not even the caller's environment turns it off
    fake = RecordingRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    ex = RayExecutor(num_cpus=2)
    assert fake.seen == [(None, "token" if callers == "token" else None)]  # Ray's token default applies
    assert os.environ["RAY_AUTH_MODE"] == "token" and ex.slots == 2 and not fake.shut


def test_a_ray_that_starts_its_instance_without_a_token_is_refused(monkeypatch):
    from frankenlab.sessions.sweep.executors import RayExecutor

    unset_auth_mode(monkeypatch)
    fake = RecordingRay(old=True)
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(RuntimeError) as err:
        RayExecutor(num_cpus=2)
    assert fake.shut  # the unprotected instance is stopped at once
    assert str(err.value) == (
        "Ray 2.50.0 started its local instance without token authentication: "
        "install ray>=2.59 (re-run the README's set-up)"
    )


def test_a_cluster_address_keeps_the_callers_auth_settings_and_a_refusal_says_what_to_set(monkeypatch):
    from frankenlab.sessions.sweep.executors import RayExecutor

    unset_auth_mode(monkeypatch)
    fake = RecordingRay(fail="Failed to connect to Ray cluster at head:6379")
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(RuntimeError) as err:
        RayExecutor(address="head:6379")
    assert fake.seen == [("head:6379", None)]  # an existing cluster decides its own authentication
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot start or reach Ray at head:6379: Failed to connect")
    assert "RAY_AUTH_MODE=token" in message and "RAY_AUTH_TOKEN" in message


def test_the_ray_floor_has_token_authentication():
    (ray,) = [
        d for d in toml.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if d[:4] == "ray>"
    ]
    assert ray.startswith("ray>=2.59")


HEAD = """
import os, sys
from frankenlab.sessions.sweep.executors import RayExecutor
import ray
ex = RayExecutor(num_cpus=1)
print("ADDRESS", ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes stdin
ex.close()
"""
CLIENT = """
import sys
from frankenlab.sessions.sweep.executors import RayExecutor
try:
    ex = RayExecutor(address=sys.argv[1])
except RuntimeError as exc:
    print("REFUSED", exc, flush=True)
    sys.exit(3)
print("CONNECTED", ex.slots, flush=True)
ex.close()
"""


def client(address: str, home, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run(
        [sys.executable, "-c", CLIENT, address],
        env={**base, "HOME": str(home), **env},
        capture_output=True,
        text=True,
    )  # no per-call timeout: pytest-timeout (pyproject) is the hang guard


@pytest.mark.slow
def test_a_started_local_instance_requires_its_token(tmp_path):
    head_home, other_home = tmp_path / "head", tmp_path / "other"
    head_home.mkdir(), other_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD],
        env={**env, "HOME": str(head_home), "RAY_AUTH_MODE": "disabled"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = ""
        for line in head.stdout:
            if line.startswith("ADDRESS "):
                address = line.split()[1]
                break
        assert address, "the Ray instance did not start"
        token = (head_home / ".ray" / "auth_token").read_text().strip()  # Ray wrote one: there was none
        assert token

        refused = client(address, other_home)  # no token (and no ~/.ray/auth_token in this HOME)
        assert refused.returncode == 3, refused.stdout + refused.stderr[-2000:]
        assert f"cannot start or reach Ray at {address}" in refused.stdout and "RAY_AUTH_TOKEN" in refused.stdout

        accepted = client(address, other_home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr[-2000:]
        assert "CONNECTED 1" in accepted.stdout
    finally:
        head.stdin.close()  # the head shuts Ray down and exits when its stdin closes
        try:
            # Cleanup, never a verdict: a head still shutting down Ray after this long (a loaded machine
            # takes seconds) is killed instead, and the test's result stands either way.
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
