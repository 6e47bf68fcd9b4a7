"""The per-user local daemon: start, status, stop, reuse across sessions, idle exit and
one daemon for concurrent starts. Every test has a socket of its own and stops the
daemon it started."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandboxd import daemon

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def paths(base_image: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[daemon.DaemonPaths]:
    """A socket of this test's own, the environment pointing at it, the daemon stopped after."""
    directory = Path(tempfile.mkdtemp(prefix="sbxd-", dir="/tmp"))
    found = daemon.DaemonPaths(directory / "sandboxd.sock")
    monkeypatch.delenv(daemon.EMBEDDED_ENV, raising=False)
    monkeypatch.setenv(daemon.SOCKET_ENV, str(found.socket))
    try:
        yield found
    finally:
        daemon.stop(found)
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def sandboxd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandboxd.cli", "daemon", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_start_status_stop(paths: daemon.DaemonPaths) -> None:
    assert sandboxd("status").returncode == 3
    started = sandboxd("start")
    assert started.returncode == 0, started.stderr
    assert "started on unix:" in started.stdout
    pid = daemon.running_pid(paths)
    assert pid is not None
    status = sandboxd("status")
    assert status.returncode == 0 and f"pid {pid}" in status.stdout
    again = sandboxd("start")
    assert "already running" in again.stdout
    stopped = sandboxd("stop")
    assert stopped.returncode == 0 and f"stopped pid {pid}" in stopped.stdout
    assert daemon.running_pid(paths) is None
    assert not paths.socket.exists()
    assert sandboxd("status").returncode == 3


def test_exits_when_idle(paths: daemon.DaemonPaths) -> None:
    started = sandboxd("start", "--idle-exit", "1")
    assert "daemon started" in started.stdout, started.stderr
    assert wait_for(lambda: daemon.running_pid(paths) is None, timeout=60)
    assert not paths.socket.exists()


def test_a_connected_client_keeps_it_alive(
    paths: daemon.DaemonPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(daemon.IDLE_ENV, "1")  # the daemon connect_local starts
    with daemon.connect_local(paths) as connection:
        assert not wait_for(lambda: daemon.running_pid(paths) is None, timeout=4)
        connection.client.server_info()
    assert wait_for(lambda: daemon.running_pid(paths) is None, timeout=60)


def test_concurrent_starts_make_one_daemon(paths: daemon.DaemonPaths) -> None:
    cmd = [sys.executable, "-m", "sandboxd.cli", "daemon", "start"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    said = [out for out, _ in outs]
    assert sum("daemon started" in s for s in said) == 1, said
    pids = {s.rsplit("pid ", 1)[1].rstrip(")\n") for s in said}
    assert pids == {str(daemon.running_pid(paths))}


def test_two_sessions_share_the_daemon_and_the_second_does_not_build(
    pytester: pytest.Pytester,
    paths: daemon.DaemonPaths,
    no_leftovers: None,
    minimal_environment: Callable[[Path], None],
) -> None:
    # The project is a directory of its own: pytester writes each run's stdout and stderr
    # beside it, and those files are not the project's (they differ from run to run).
    project = pytester.mkdir("proj")
    # The fragment goes below the environment's images: with the whole mirrored
    # virtualenv on top, the first session's build alone took over a minute.
    minimal_environment(project)
    project.joinpath("test_once.py").write_text(
        "import pytest\n\n"
        '@pytest.mark.sandbox(dockerfile="RUN echo daemon-reuse > /marker")\n'
        "def test_inside():\n"
        '    assert open("/marker").read() == "daemon-reuse\\n"\n'
    )
    where = ("--rootdir", "proj", "proj")
    first = pytester.runpytest_subprocess("--sandbox", "-p", "no:cacheprovider", *where)
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["sandbox: * via the local sandboxd daemon (unix:*"])
    pid = daemon.running_pid(paths)
    assert pid is not None, "the session left no daemon to reuse"
    second = pytester.runpytest_subprocess("--sandbox", "-p", "no:cacheprovider", *where)
    second.assert_outcomes(passed=1)
    assert "building sandbox image" not in second.stdout.str()
    assert daemon.running_pid(paths) == pid
    embedded = pytester.runpytest_subprocess("--sandbox", "--sandbox-embedded", *where)
    embedded.assert_outcomes(passed=1)
    embedded.stdout.fnmatch_lines(["sandbox: * via a sandboxd embedded in this session*"])
