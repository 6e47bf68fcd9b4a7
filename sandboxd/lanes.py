"""Fair use of the server's threads: no client can hold them all, and health checks and cheap
reads never wait behind stalled calls.

grpc's synchronous server gives every call one worker thread for its whole life, and a
client stream that never sends a message holds its thread forever: one client could take
them all. So every authenticated client has a cap on open calls, a client stream must send
its first message within a deadline (else it is cancelled), and the calls that must answer
promptly (health, server info, listings) run on a small pool of their own, through grpc's
`experimental_thread_pool` attribute of a handler's behavior.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from sandboxd.auth import Behavior, rewrapped
from sandboxd.auth import _Interceptor as Interceptor
from sandboxd.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from sandboxd.service import abort_with, owner_of

log = logging.getLogger(__name__)

#: Methods served from the reserved pool: quick, and what a prober or a scheduler polls.
CHEAP_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/sandbox.v1.InfoService/GetServerInfo",
        "/sandbox.v1.ImageService/GetImage",
        "/sandbox.v1.ImageService/ListImages",
        "/sandbox.v1.SandboxService/GetSandbox",
        "/sandbox.v1.SandboxService/ListSandboxes",
        "/sandbox.v1.BlobService/FindMissingBlobs",
    }
)
#: Threads of the reserved pool.
CHEAP_WORKERS = 4
#: When a client over its cap is told to come back.
RETRY_AFTER = 1.0


class CallLanes(Interceptor):
    """Counts each client's open calls, cancels client streams whose first message is late,
    and routes cheap calls to their own pool. Installed inside the authenticating
    interceptor, so the caller's name is already in the metadata."""

    def __init__(self, max_calls_per_client: int, first_message_seconds: float) -> None:
        self.max_calls = max_calls_per_client
        self.first_message_seconds = first_message_seconds
        self.cheap_pool = futures.ThreadPoolExecutor(
            max_workers=CHEAP_WORKERS, thread_name_prefix="sandboxd-cheap"
        )
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()

    def open_calls(self, owner: str) -> int:
        with self._lock:
            return self._open[owner]

    def _enter(self, owner: str) -> bool:
        """Count a call of `owner`'s; False (and not counted) when it is at its cap. The
        operator ("") has no cap: it is the machine's own user."""
        with self._lock:
            if owner and self.max_calls and self._open[owner] >= self.max_calls:
                return False
            self._open[owner] += 1
            return True

    def _leave(self, owner: str) -> None:
        with self._lock:
            self._open[owner] -= 1
            if self._open[owner] <= 0:
                del self._open[owner]

    def _refuse(self, owner: str, context: grpc.ServicerContext) -> None:
        log.info("client %s is at its cap of %d open calls", owner, self.max_calls)
        abort_with(
            context,
            ResourceExhausted(
                f"client {owner!r} has {self.max_calls} calls open, the most this server "
                "allows one client; wait for some to finish",
                retry_after=RETRY_AFTER,
            ),
        )

    def _counted(self, behavior: Behavior) -> Behavior:
        @functools.wraps(behavior)
        def counted(request: Any, context: grpc.ServicerContext) -> Any:
            owner = owner_of(context)
            if not self._enter(owner):
                self._refuse(owner, context)
            try:
                return behavior(request, context)
            finally:
                self._leave(owner)

        return counted

    def _counted_stream(self, behavior: Behavior) -> Behavior:
        @functools.wraps(behavior)
        def counted(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            owner = owner_of(context)
            if not self._enter(owner):
                self._refuse(owner, context)
            try:
                yield from behavior(request, context)
            finally:
                self._leave(owner)

        return counted

    def _watched(self, behavior: Behavior) -> Behavior:
        """A client stream whose first message is due within `first_message_seconds`."""

        @functools.wraps(behavior)
        def watched(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behavior(_FirstMessage(requests, context, self.first_message_seconds), context)

        return watched

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None
        cheap = details.method in CHEAP_METHODS

        def wrap(kind: str, behavior: Behavior) -> Behavior:
            if kind.startswith("stream_") and self.first_message_seconds > 0:
                behavior = self._watched(behavior)
            if kind.endswith("_stream"):
                behavior = self._counted_stream(behavior)
            else:
                behavior = self._counted(behavior)
            if cheap:
                behavior.experimental_thread_pool = self.cheap_pool  # type: ignore[attr-defined]
            return behavior

        return rewrapped(handler, wrap)

    def shutdown(self) -> None:
        self.cheap_pool.shutdown(wait=False, cancel_futures=True)


class _FirstMessage:
    """Iterates a client stream; when its first message does not come within `seconds` the
    call is cancelled, which ends the wait (grpc has no read timeout for a server-side
    stream). Later messages may take their time: an interactive stream waits on a person."""

    def __init__(self, requests: Iterator[Any], context: grpc.ServicerContext, seconds: float):
        self._requests = requests
        self._context = context
        self._seconds = seconds
        self._first = True
        self._expired = threading.Event()

    def __iter__(self) -> _FirstMessage:
        return self

    def __next__(self) -> Any:
        """The next message.

        Raises:
            DeadlineExceeded: the first did not come in time (the call is cancelled already).
            Cancelled: the client cancelled the call.
        """
        if not self._first:
            return self._next()
        self._first = False
        timer = threading.Timer(self._seconds, self._expire)
        timer.daemon = True
        timer.start()
        try:
            return self._next()
        finally:
            timer.cancel()

    def _next(self) -> Any:
        try:
            return next(self._requests)
        except grpc.RpcError:
            # A cancelled call's request iterator raises grpc's bare error: say which.
            if self._expired.is_set():
                raise DeadlineExceeded(
                    f"no first message within {self._seconds:g}s on a client stream"
                ) from None
            raise Cancelled("the client cancelled the call") from None

    def _expire(self) -> None:
        self._expired.set()
        log.info(
            "%s sent no first message within %gs on a client stream; cancelling it",
            self._context.peer(),
            self._seconds,
        )
        self._context.cancel()  # type: ignore[no-untyped-call]
