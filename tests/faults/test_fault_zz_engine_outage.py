"""The Docker engine goes away under a running sandboxd and comes back.

Disruptive: it stops the machine's dockerd. conftest.py orders this module last in the
session, and dockerd is always started again (as scripts/host-setup.sh starts it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sandboxd_process import containers_of, wait_until

from sandboxd import errors
from sandboxd.api import SandboxRequest, requested_limits
from sandboxd.client import SandboxClient

PIDFILE = Path("/var/run/docker.pid")
DOCKERD_LOG = os.environ.get("DOCKERD_LOG", "/var/log/dockerd.log")


def _engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _dockerd_pid() -> int | None:
    try:
        pid = int(PIDFILE.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _start_dockerd() -> None:
    if _engine_answers():
        return
    # A dockerd still shutting down (it stops every container first) is waited for.
    wait_until(lambda: _dockerd_pid() is None or _engine_answers(), 180, interval=0.5)
    if _dockerd_pid() is None:
        PIDFILE.unlink(missing_ok=True)
        with open(DOCKERD_LOG, "ab") as log:
            subprocess.Popen(
                ["dockerd"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlive this test run, like setsid nohup
            )
    assert wait_until(_engine_answers, 90, interval=0.5), "dockerd did not come back"


@pytest.fixture
def engine_outage():
    """A callable that stops dockerd; dockerd is started again whatever happens."""
    pid = _dockerd_pid()
    assert pid is not None, "no dockerd pid in /var/run/docker.pid"

    def stop() -> None:
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: _dockerd_pid() is None, 180, interval=0.2), "dockerd kept on"
        assert not _engine_answers()

    try:
        yield stop
    finally:
        _start_dockerd()


def test_engine_outage_gives_unavailable_then_recovers_without_restart(
    sandboxd, engine_outage
) -> None:
    proc = sandboxd()
    spec = SandboxRequest(limits=requested_limits(memory_bytes=64 << 20), ttl_seconds=300)
    with SandboxClient(proc.address, retry_seconds=1.0) as client:
        before = client.create_sandbox(spec)
        assert client.exec(before.id, ["true"]).verdict == "ok"

        engine_outage()

        started = time.monotonic()
        with pytest.raises(errors.EngineUnavailable) as caught:
            client.create_sandbox(spec)
        assert time.monotonic() - started < 30
        assert "Docker engine" in caught.value.message, caught.value.message
        with pytest.raises(errors.SandboxError) as exec_error:
            client.exec(before.id, ["true"], timeout=10)
        assert exec_error.value.code == "UNAVAILABLE", exec_error.value
        # The service itself stays up and says so.
        assert client.health() == "SERVING"

        _start_dockerd()

        # Same sandboxd process, no restart: calls work again.
        after = client.create_sandbox(spec)
        assert client.exec(after.id, ["sh", "-c", "echo back"]).verdict == "ok"
        client.destroy_sandbox(after.id)
        with contextlib.suppress(errors.SandboxError):
            client.destroy_sandbox(before.id)
    assert proc.proc.poll() is None
    assert wait_until(lambda: containers_of(proc.instance_id) == [], 30)
