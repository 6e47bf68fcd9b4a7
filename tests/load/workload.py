"""The load: N client threads, each with its own channel, cycling sandboxes through every RPC.

Used by tests/load (a short round) and benchmarks/load.py (the full few hundred).
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sandboxd import errors
from sandboxd.api import ExecResult, SandboxRequest, requested_limits
from sandboxd.archives import tar_of
from sandboxd.client import SandboxClient

T = TypeVar("T")

#: Status codes the API documents (sandbox.proto's header). Anything else is a bug.
DOCUMENTED = {
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
}
RPCS = ("CreateSandbox", "PutFiles", "Exec", "GetFiles", "DestroySandbox")


@dataclass
class LoadResult:
    clients: int
    rounds: int
    wall_seconds: float = 0.0
    sandboxes: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    #: (rpc, status code name, message) of every call that did not succeed.
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    #: Problems with what came back (wrong output, a bad tar...), not statuses.
    wrong: list[str] = field(default_factory=list)
    resource_exhausted_retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def undocumented(self) -> list[tuple[str, str, str]]:
        return [f for f in self.failures if f[1] not in DOCUMENTED]

    def percentile(self, rpc: str, q: float) -> float:
        values = sorted(self.latencies.get(rpc, []))
        if not values:
            return float("nan")
        index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
        return values[index]

    def throughput(self) -> float:
        return self.sandboxes / self.wall_seconds if self.wall_seconds else 0.0

    def table(self) -> str:
        rows = [f"{'rpc':<16}{'calls':>7}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}"]
        for rpc in RPCS:
            values = self.latencies.get(rpc, [])
            if not values:
                continue
            rows.append(
                f"{rpc:<16}{len(values):>7}{self.percentile(rpc, 0.5) * 1e3:>10.1f}"
                f"{self.percentile(rpc, 0.99) * 1e3:>10.1f}{max(values) * 1e3:>10.1f}"
            )
        return "\n".join(rows)


def _timed(result: LoadResult, rpc: str, fn: Callable[[], T]) -> T:
    started = time.monotonic()
    try:
        value = fn()
    except errors.SandboxError as exc:
        with result.lock:
            result.failures.append((rpc, str(getattr(exc, "code", "?")), exc.message))
        raise
    with result.lock:
        result.latencies[rpc].append(time.monotonic() - started)
    return value


def _one_sandbox(client: SandboxClient, result: LoadResult, spec: SandboxRequest, n: int) -> None:
    sandbox = None
    for _ in range(20):
        try:
            sandbox = _timed(result, "CreateSandbox", lambda: client.create_sandbox(spec))
            break
        except errors.ResourceExhausted as exc:
            # The documented answer to a full service: back off by the hint, then retry.
            with result.lock:
                result.resource_exhausted_retries += 1
            time.sleep(min(exc.retry_after or 1.0, 2.0))
    if sandbox is None:
        return
    try:
        payload = os.urandom(2048 + n % 4096).hex().encode()
        _timed(
            result,
            "PutFiles",
            lambda: client.put_files(sandbox.id, "", tar_of({"in/data.txt": payload})),
        )
        chunks: list[bytes] = []

        def run() -> ExecResult:
            script = "wc -c < in/data.txt; for i in 1 2 3 4 5; do echo line $i; done; echo e >&2"
            for event in client.exec_stream(sandbox.id, ["sh", "-c", script], timeout=30):
                if isinstance(event, ExecResult):
                    return event
                if event.stream == "stdout":
                    chunks.append(event.data)
            raise errors.SandboxError("exec stream ended without a result")

        outcome = _timed(result, "Exec", run)
        stdout = b"".join(chunks).decode()
        if outcome.verdict != "ok" or not stdout.startswith(f"{len(payload)}\n"):
            with result.lock:
                result.wrong.append(f"exec: verdict {outcome.verdict} {outcome.message} {stdout!r}")
        tar = _timed(result, "GetFiles", lambda: client.get_files(sandbox.id, "in/data.txt"))
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            member = archive.extractfile("data.txt")
            got = member.read() if member is not None else b""
        if got != payload:
            with result.lock:
                result.wrong.append(f"get_files: {len(got)} bytes back, {len(payload)} sent")
    finally:
        _timed(
            result,
            "DestroySandbox",
            lambda: client.destroy_sandbox(sandbox.id, missing_ok=False),
        )
        with result.lock:
            result.sandboxes += 1


def run_load(
    address: str,
    *,
    clients: int = 16,
    rounds: int = 2,
    image: str = "",
    memory: int = 64 << 20,
    ttl_seconds: float = 300.0,
) -> LoadResult:
    """Every client thread runs `rounds` sandboxes through create/put/exec/get/destroy."""
    result = LoadResult(clients=clients, rounds=rounds)
    spec = SandboxRequest(
        image=image,
        limits=requested_limits(
            memory_bytes=memory, pids=64, scratch_bytes=16 << 20, timeout_seconds=60
        ),
        ttl_seconds=ttl_seconds,
        labels={"purpose": "load"},
    )
    start = threading.Barrier(clients)
    crashed: list[BaseException] = []

    def client_thread(index: int) -> None:
        try:
            with SandboxClient(address, retry_seconds=10.0) as client:
                start.wait(timeout=60)
                for r in range(rounds):
                    # A failed call is recorded in result.failures by _timed.
                    with contextlib.suppress(errors.SandboxError):
                        _one_sandbox(client, result, spec, index * 1000 + r)
        except BaseException as exc:
            crashed.append(exc)

    threads = [
        threading.Thread(target=client_thread, args=(i,), name=f"load-client-{i}")
        for i in range(clients)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_seconds = time.monotonic() - started
    if crashed:
        raise RuntimeError(f"{len(crashed)} client threads crashed") from crashed[0]
    return result


def snapshot(proc: Any) -> dict[str, int]:
    """RSS, fds and threads of a SandboxdProcess."""
    return {"rss": proc.rss_bytes(), "fds": proc.fds(), "threads": proc.threads()}
