"""What a routing session starts at configure time, on threads, while pytest collects.

Neither the project's snapshot nor the connection to the service depends on what is
collected, and both take a while: the snapshot mostly waits on git and the disk, the
connection on importing grpc and on the service's answer. Each gets its own thread, so
the one waits while the other runs; the main thread joins them only when the first
routed test needs them.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from pytest_sandbox.snapshot import Snapshot
from sandboxd.connection import Connection

T = TypeVar("T")


class Background(Generic[T]):
    """One call on a daemon thread; `result` re-raises what it raised, on the caller's."""

    def __init__(self, name: str, call: Callable[[], T]) -> None:
        self._call = call
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as exc:  # re-raised on the thread that asks for the result
            self._error = exc

    def done(self) -> T | None:
        """The value once the call has ended, None when it failed."""
        self._thread.join()
        return self._value

    def result(self) -> T:
        """Raises: whatever the call raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


_frozen = threading.Event()


def freeze_heap(*, last: bool) -> None:
    """Move every object alive now out of the cyclic collector's way (`gc.freeze`).

    A routing session does it when it is configured and again once the client side is
    imported. What the heap holds then is mostly modules and their objects, which live to
    the end anyway; grpc and protobuf add many. Each full collection after that (the
    automatic ones while the client side imports, pytest's own at the session's end, the
    interpreter's at exit) walked them all. Objects made later (collected items, the
    tests' own) are collected as usual; only a reference cycle that was alive here and
    dropped later stays in memory. Only the first session in a process does it, so a
    second one (pytester in-process) does not keep the first one's leftovers.
    """
    if not _frozen.is_set():
        gc.freeze()
        if last:
            _frozen.set()


class Startup:
    """The snapshot and the connection, begun together; `prepare` runs on the snapshot's
    thread once both are there (the controller builds its runner, importing the client
    side off the main thread)."""

    def __init__(
        self,
        take: Callable[[], Snapshot],
        connect: Callable[[], Connection],
        prepare: Callable[[Connection, Snapshot], None],
    ) -> None:
        self._connection = Background("sandbox-connect", connect)
        self._prepare = prepare
        self._take = take
        self._snapshot = Background("sandbox-snapshot", self._snapshot_then_prepare)

    def _snapshot_then_prepare(self) -> Snapshot:
        snap = self._take()
        conn = self._connection.done()
        if conn is not None:
            self._prepare(conn, snap)
        return snap

    def connection(self) -> Connection | None:
        """The connection once made (None when it failed), for the session to close."""
        self._snapshot.done()  # nothing uses the connection after this
        return self._connection.done()

    def ready(self) -> tuple[Snapshot, Connection]:
        """Wait for both.

        Raises:
            SandboxError, SnapshotTooLarge, EnvironmentProblem, OSError: from either.
        """
        snap = self._snapshot.result()
        return snap, self._connection.result()
