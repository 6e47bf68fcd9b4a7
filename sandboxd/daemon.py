"""The per-user local sandboxd: found on a well-known unix socket, started when none answers.

A developer's second `pytest --sandbox` should start tests at once, so the service
(its image cache and warm pool) outlives one session. Clients reach it through
`connect_local`, which starts it in the background when nothing answers on the socket.

Three files beside the socket keep this race-free without a supervisor:
- `sandboxd.lock`: held (exclusive) while a client checks for the daemon and starts it,
  and while the daemon decides to exit; two sessions starting at once get one daemon.
- `sandboxd.clients`: every connected client holds a shared lock on it; the daemon
  counts as idle only while it can take the lock exclusively (no client is connected).
- `sandboxd.pid`: the daemon's pid, locked by the daemon for its whole life, so a
  stale pid (a killed daemon, a reused pid) is never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd import errors
from sandboxd.connection import Connection, connect

if TYPE_CHECKING:
    from sandboxd.channels import TlsCredentials
    from sandboxd.client import SandboxClient
    from sandboxd.config import ServerConfig
    from sandboxd.server import Service

log = logging.getLogger(__name__)

#: Overrides where the daemon's socket lives (a test suite's own daemon, a second daemon).
SOCKET_ENV = "SANDBOXD_SOCKET"
#: Set to 1: no address means a service embedded in the process, not the daemon.
EMBEDDED_ENV = "SANDBOXD_EMBEDDED"
#: Seconds without clients after which a daemon started on demand exits.
IDLE_ENV = "SANDBOXD_IDLE_EXIT"
UNIX_PATH_MAX = 107
START_TIMEOUT = 60.0
#: Spawned daemons, kept referenced: a dropped Popen of a running child warns.
_spawned: list[subprocess.Popen[bytes]] = []


@dataclass(frozen=True)
class DaemonPaths:
    """The socket and the files that live beside it."""

    socket: Path

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def _beside(self, suffix: str) -> Path:
        return self.socket.with_name(f"{self.socket.stem}.{suffix}")

    @property
    def lock(self) -> Path:
        return self._beside("lock")

    @property
    def clients(self) -> Path:
        return self._beside("clients")

    @property
    def pid(self) -> Path:
        return self._beside("pid")

    @property
    def log(self) -> Path:
        return self._beside("log")


def default_paths() -> DaemonPaths:
    """`$SANDBOXD_SOCKET`, else `$XDG_RUNTIME_DIR/sandboxd/sandboxd.sock`, else
    `~/.cache/sandbox/sandboxd.sock`.

    XDG_RUNTIME_DIR is the per-user place for sockets (mode 0700, on tmpfs, emptied at
    logout), so no stale socket survives a reboot and no other user can reach it; where
    it is missing (containers, cron), the home directory is still the user's own, unlike
    /tmp, where another user could create the directory first.
    """
    named = os.environ.get(SOCKET_ENV)
    if named:
        return DaemonPaths(Path(named).expanduser())
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return DaemonPaths(Path(runtime) / "sandboxd" / "sandboxd.sock")
    return DaemonPaths(Path.home() / ".cache" / "sandbox" / "sandboxd.sock")


def embedded_by_default() -> bool:
    """Whether the environment asks for an embedded service (test suites, CI)."""
    return os.environ.get(EMBEDDED_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[int]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def quiet_collector() -> Iterator[None]:
    """No full collections while a serving process starts; what it made by then (modules,
    the service's objects, all living to the end) is frozen out of later ones.

    Starting imports grpc, protobuf, docker-py and the service, which allocate much and
    free little: each automatic collection walked all of it again.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _prepare(paths: DaemonPaths) -> None:
    """Raises: InvalidArgument: the socket path is longer than the kernel takes."""
    if len(str(paths.socket)) > UNIX_PATH_MAX:
        raise errors.InvalidArgument(
            f"the daemon socket path {paths.socket} is longer than {UNIX_PATH_MAX} bytes; "
            f"set {SOCKET_ENV} to a shorter one"
        )
    paths.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)


def answers(paths: DaemonPaths, timeout: float = 2.0) -> bool:
    """Whether a service answers health checks on the socket."""
    client = _answering_client(paths, timeout)
    if client is None:
        return False
    client.close()
    return True


def _answering_client(paths: DaemonPaths, timeout: float) -> SandboxClient | None:
    """A client of the service on the socket once it answers health checks, else None."""
    if not paths.socket.exists():
        return None
    from sandboxd.client import SandboxClient

    client = SandboxClient(paths.address)
    try:
        client.wait_ready(timeout=timeout)
    except errors.SandboxError:
        client.close()
        return None
    return client


class DaemonConnection(Connection):
    """A connection to the daemon that holds a client lease until it is closed."""

    def __init__(self, connection: Connection, lease: int) -> None:
        super().__init__(connection.client)
        self._lease: int | None = lease

    def close(self, *, keep: Collection[str] = ()) -> None:
        super().close()
        if self._lease is not None:
            # The daemon looks for clients now and then; the file's time tells it when
            # the last one left, so the idle time counts from then.
            with contextlib.suppress(OSError):
                os.utime(self._lease)
            os.close(self._lease)
            self._lease = None


def connect_local(
    paths: DaemonPaths | None = None,
    *,
    config_path: Path | None = None,
) -> Connection:
    """Connect to the per-user daemon, starting it first when none answers.

    Raises:
        SandboxError: the daemon cannot be started or reached.
    """
    paths = paths or default_paths()
    _prepare(paths)
    lease = os.open(paths.clients, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        with _flock(paths.lock, fcntl.LOCK_EX):
            # The lease is taken before the check, under the start lock: a daemon deciding
            # to exit holds the start lock too, so it either sees this client or is gone.
            fcntl.flock(lease, fcntl.LOCK_SH)
            # The client that found the daemon answering is the session's client: a
            # second channel and health check would cost a warm session a round trip.
            client = _answering_client(paths, 2.0)
            if client is None:
                client = _start(paths, config_path)
        connection = Connection(client)
    except BaseException:
        os.close(lease)
        raise
    return DaemonConnection(connection, lease)


def open_connection(
    address: str | None,
    *,
    config: ServerConfig | None = None,
    credentials: TlsCredentials | None = None,
    local: bool = True,
    config_path: Path | None = None,
    address_option: str = "--address",
) -> Connection:
    """The service at `address`; without one, the local daemon when `local` (and the
    environment does not ask for an embedded service), else one embedded here.

    Raises:
        SandboxError: none can be reached or started.
    """
    if address or not local or embedded_by_default():
        return connect(
            address, config=config, credentials=credentials, address_option=address_option
        )
    return connect_local(config_path=config_path)


def ensure_started(
    paths: DaemonPaths, config_path: Path | None = None, idle: float | None = None
) -> bool:
    """Start the daemon unless one answers; True when this call started it.

    Raises:
        SandboxError: it cannot be started.
    """
    _prepare(paths)
    with _flock(paths.lock, fcntl.LOCK_EX):
        if answers(paths):
            return False
        _start(paths, config_path, idle).close()
        return True


def _start(
    paths: DaemonPaths,
    config_path: Path | None,
    idle: float | None = None,
) -> SandboxClient:
    """Spawn `sandboxd daemon run` in its own session; the client that saw it answer
    (the session's: a second channel and health check would cost a cold start one more).

    Raises:
        EngineUnavailable: it exited or did not answer in time (with its log's tail).
    """
    argv = [sys.executable, "-m", "sandboxd.cli"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    argv += ["daemon", "run", "--socket", str(paths.socket)]
    idle_text = os.environ.get(IDLE_ENV, "") if idle is None else str(idle)
    if idle_text:
        argv += ["--idle-exit", idle_text]
    with open(paths.log, "ab") as out:
        # cwd /: the daemon must not keep the directory it was started from (a test's
        # tmp dir, a checkout about to be removed) busy.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/", start_new_session=True
        )
    _spawned.append(proc)
    deadline = time.monotonic() + START_TIMEOUT
    while (client := _answering_client(paths, 0.5)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            state = "exited" if proc.returncode is not None else "did not answer in time"
            raise errors.EngineUnavailable(
                f"the local sandboxd {state}; its log {paths.log} ends with:\n{_tail(paths.log)}"
            )
        time.sleep(0.05)
    return client


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def running_pid(paths: DaemonPaths) -> int | None:
    """The daemon's pid while it holds its pid file's lock, else None."""
    try:
        fd = os.open(paths.pid, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # locked: the daemon is alive
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    else:
        return None
    finally:
        os.close(fd)


def stop(paths: DaemonPaths, timeout: float = 30.0) -> int | None:
    """Ask the daemon to stop and wait until it has; returns its pid, None if none ran.

    Raises:
        EngineUnavailable: it is still running after `timeout`.
    """
    pid = running_pid(paths)
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running_pid(paths) is not None:
        if time.monotonic() > deadline:
            raise errors.EngineUnavailable(f"the local sandboxd (pid {pid}) did not stop")
        time.sleep(0.05)
    return pid


def control(
    action: str, paths: DaemonPaths, config_path: Path | None, idle: float | None
) -> tuple[int, str]:
    """`sandboxd daemon start|stop|status`: (exit code, what to tell the person); status
    exits 3 when no daemon answers.

    Raises:
        SandboxError: it cannot be started or stopped.
    """
    if action == "start":
        started = ensure_started(paths, config_path, idle)
        state = "started" if started else "already running"
        return 0, f"sandboxd daemon {state} on {paths.address} (pid {running_pid(paths)})"
    if action == "stop":
        pid = stop(paths)
        return 0, "no sandboxd daemon was running" if pid is None else f"stopped pid {pid}"
    pid = running_pid(paths)
    if pid is None or not answers(paths):
        return 3, f"no sandboxd daemon on {paths.address}"
    return 0, f"sandboxd daemon pid {pid} on {paths.address}, log {paths.log}"


class Daemon:
    """The serving side: one service on the socket until a signal or the idle time."""

    def __init__(self, config: ServerConfig, paths: DaemonPaths, idle_seconds: float) -> None:
        self.config = config
        self.paths = paths
        self.idle_seconds = idle_seconds
        self._stop = threading.Event()

    def run(self) -> int:
        """Serve; returns when stopped by SIGTERM/SIGINT or after `idle_seconds` idle.

        Raises:
            EngineUnavailable: another daemon serves this socket.
        """
        _prepare(self.paths)
        pid_fd = os.open(self.paths.pid, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise errors.EngineUnavailable(
                    f"another sandboxd daemon serves {self.paths.socket}"
                ) from None
            os.ftruncate(pid_fd, 0)
            os.pwrite(pid_fd, f"{os.getpid()}\n".encode(), 0)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self._stop.set())
            # A developer's runs are minutes apart: the service-wide pool idle time would
            # empty the warm pool between two of them.
            config = replace(self.config, pool_idle_seconds=self.config.daemon_pool_idle_seconds)
            with quiet_collector():
                from sandboxd.server import create_server

                service, bound = create_server(config, self.paths.address)
            log.info(
                "sandboxd daemon %d on %s, exits after %.0fs idle",
                os.getpid(),
                bound,
                self.idle_seconds,
            )
            try:
                self._wait_idle(service)
            finally:
                service.stop()
            return 0
        finally:
            with contextlib.suppress(OSError):
                self.paths.pid.unlink()
            os.close(pid_fd)

    def _wait_idle(self, service: Service) -> None:
        """Return on a signal, or once no client and no sandbox has been seen for
        `idle_seconds`; the idle exit keeps the start lock until the socket is gone."""
        last_busy = time.monotonic()
        interval = max(0.2, min(5.0, self.idle_seconds / 4))
        while not self._stop.wait(interval):
            if self._busy(service):
                last_busy = time.monotonic()
                continue
            if self._since_last_client(last_busy) < self.idle_seconds:
                continue
            with _flock(self.paths.lock, fcntl.LOCK_EX):
                if self._busy(service):
                    last_busy = time.monotonic()
                    continue
                log.info("idle for %.0fs: exiting", self.idle_seconds)
                service.stop()
                return

    def _since_last_client(self, last_busy: float) -> float:
        """Seconds since a client was last seen here or last left (its lease's mtime)."""
        since = time.monotonic() - last_busy
        with contextlib.suppress(OSError):
            since = min(since, time.time() - self.paths.clients.stat().st_mtime)
        return since

    def _busy(self, service: Service) -> bool:
        if service.core.manager.list():
            return True
        fd = os.open(self.paths.clients, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops the lock taken just to look
        return False
