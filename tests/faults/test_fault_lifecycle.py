"""The service dies, is stopped, or loses its client: sandboxes never outlive their promise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from sandboxd_process import SandboxdProcess, containers_of, docker_lines, wait_until

from sandboxd import errors
from sandboxd.api import SandboxRequest, requested_limits
from sandboxd.client import SandboxClient


def _spec(ttl: float = 120.0) -> SandboxRequest:
    return SandboxRequest(
        limits=requested_limits(memory_bytes=64 << 20, timeout_seconds=120), ttl_seconds=ttl
    )


def _processes(container_id: str) -> str:
    """The container's process list as the host sees it ('' once it is gone)."""
    return "\n".join(docker_lines("top", container_id, "-eo", "pid,args"))


def test_sigterm_lets_running_execs_finish_or_cancels_them_then_removes_everything(
    sandboxd,
) -> None:
    grace = 4.0
    proc: SandboxdProcess = sandboxd(grace=grace)
    outcomes: dict[str, object] = {}

    def run(name: str, script: str) -> None:
        with SandboxClient(proc.address, retry_seconds=0) as client:
            sandbox = client.create_sandbox(_spec())
            outcomes[f"{name}-created"] = True
            try:
                out = bytearray()
                result = client.exec(
                    sandbox.id, ["sh", "-c", script], on_output=lambda s, d: out.extend(d)
                )
                outcomes[name] = (result.verdict, bytes(out))
            except errors.SandboxError as exc:
                outcomes[name] = exc

    short = threading.Thread(target=run, args=("short", "sleep 1.5; echo finished"))
    long = threading.Thread(target=run, args=("long", "echo started; sleep 600"))
    short.start()
    long.start()
    assert wait_until(lambda: "short-created" in outcomes and "long-created" in outcomes, 30)
    time.sleep(0.5)
    ids = containers_of(proc.instance_id)
    assert len(ids) == 2

    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = proc.proc.wait(timeout=grace + 30)
    took = time.monotonic() - started
    short.join(10)
    long.join(10)

    assert code == 0, proc.log()
    assert took < grace + 15, took
    # The exec that fits in the grace period finishes with its output...
    assert outcomes["short"] == ("ok", b"finished\n"), outcomes
    # ...the one that does not is cancelled, with a status, not left hanging.
    assert isinstance(outcomes["long"], errors.SandboxError), outcomes
    assert outcomes["long"].code in ("CANCELLED", "UNAVAILABLE"), outcomes["long"]
    assert wait_until(lambda: containers_of(proc.instance_id) == [], 15), "containers left"
    assert not proc.socket.exists()


def test_kill_9_then_restart_reaps_leftovers_and_serves_at_once(sandboxd) -> None:
    first: SandboxdProcess = sandboxd()
    with SandboxClient(first.address) as client:
        for _ in range(3):
            client.create_sandbox(_spec())
    assert len(containers_of(first.instance_id)) == 3
    first.kill9()
    assert len(containers_of(first.instance_id)) == 3  # nobody cleaned up: it died

    second: SandboxdProcess = sandboxd()
    # Serving already implies the reap is done: leftovers go before the port opens.
    assert containers_of(first.instance_id) == []
    assert second.started_seconds < 15, second.started_seconds
    with SandboxClient(second.address) as client:
        sandbox = client.create_sandbox(_spec())
        assert client.exec(sandbox.id, ["true"]).verdict == "ok"
        client.destroy_sandbox(sandbox.id)


_CLIENT = """
import sys
from sandboxd.client import SandboxClient
from sandboxd.api import ExecResult, SandboxRequest, requested_limits
client = SandboxClient(sys.argv[1])
spec = SandboxRequest(limits=requested_limits(memory_bytes=64 << 20, timeout_seconds=120),
                      ttl_seconds=float(sys.argv[2]))
sandbox = client.create_sandbox(spec)
print(sandbox.id, sandbox.container_id, flush=True)
script = "while true; do echo tick; sleep 0.05; done" if sys.argv[3] == "stream" else "sleep 600"
for event in client.exec_stream(sandbox.id, ["sh", "-c", script], timeout=100):
    if not isinstance(event, ExecResult):
        print("output", flush=True)
"""


def _vanishing_client(address: str, ttl: float, mode: str) -> tuple[str, str]:
    """A client process that starts an exec and is killed -9 in the middle of it."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, address, str(ttl), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        sandbox_id, container_id = child.stdout.readline().split()
        if mode == "stream":
            assert child.stdout.readline().strip() == "output"
        else:
            time.sleep(1.0)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    return sandbox_id, container_id


def test_client_vanishing_mid_stream_kills_the_exec_and_ttl_destroys_the_sandbox(
    sandboxd,
) -> None:
    proc = sandboxd()
    ttl = 6.0
    started = time.monotonic()
    _, container_id = _vanishing_client(proc.address, ttl, "stream")
    # The exec is killed as soon as the service notices the call is gone...
    assert wait_until(lambda: "sleep 0.05" not in _processes(container_id), 10), _processes(
        container_id
    )
    # ...and the sandbox nobody will destroy goes when its TTL ends.
    assert wait_until(lambda: containers_of(proc.instance_id) == [], ttl + 10)
    assert time.monotonic() - started < ttl + 10
    with SandboxClient(proc.address) as client:
        assert client.list_sandboxes() == []


def test_client_vanishing_mid_exec_without_output_kills_the_exec(sandboxd) -> None:
    proc = sandboxd()
    _, container_id = _vanishing_client(proc.address, 6.0, "silent")
    assert wait_until(lambda: "sleep 600" not in _processes(container_id), 10), _processes(
        container_id
    )
    assert wait_until(lambda: containers_of(proc.instance_id) == [], 20)


def test_container_killed_from_outside_mid_exec_is_crashed_and_cleaned_up(sandboxd) -> None:
    proc = sandboxd()
    with SandboxClient(proc.address, retry_seconds=0) as client:
        sandbox = client.create_sandbox(_spec(ttl=8.0))
        killer = threading.Timer(1.0, lambda: docker_lines("kill", sandbox.container_id))
        killer.start()
        started = time.monotonic()
        result = client.exec(sandbox.id, ["sh", "-c", "echo up; sleep 600"], timeout=60)
        killer.join()
        assert time.monotonic() - started < 20
        assert result.verdict == "crashed", result
        assert "crashed" in result.message
        # The sandbox is known to be dead: further execs say so plainly.
        try:
            client.exec(sandbox.id, ["true"])
            raise AssertionError("exec into a dead sandbox succeeded")
        except errors.SandboxError as exc:
            assert exc.code in ("FAILED_PRECONDITION", "NOT_FOUND"), exc
        client.destroy_sandbox(sandbox.id)
    assert wait_until(lambda: containers_of(proc.instance_id) == [], 20)
