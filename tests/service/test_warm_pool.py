"""The warm pool and preload attach against the real engine (the other service tests
turn the pool off), and the per-exec peak memory of two execs in one sandbox."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandboxd import errors
from sandboxd.api import ExecResult, Sandbox, SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.config import ServerConfig
from sandboxd.engine.base import LABEL_INSTANCE
from sandboxd.limits import Limits, MiB
from sandboxd.server import Service, create_server

# The preload prints a line at once, then echoes its stdin upper-cased once attached.
PRELOAD = [
    "python3",
    "-c",
    "import sys; print('ready', flush=True); print(sys.stdin.read().upper())",
]


@pytest.fixture
def warm(
    config_factory: Callable[..., ServerConfig], short_tmp: Path, base_image: str
) -> Iterator[Service]:
    """A service of its own with a warm pool of one per request."""
    svc, _ = create_server(
        config_factory(pool_max_per_key=1, pool_workers=1, pool_idle_seconds=300.0),
        f"unix:{short_tmp}/warm.sock",
    )
    try:
        yield svc
    finally:
        svc.stop(grace=2.0)
    instance = svc.config.instance_id
    assert wait_until(lambda: not containers_of(instance)), "warm containers were left"


@pytest.fixture
def warm_client(warm: Service) -> Iterator[SandboxClient]:
    c = SandboxClient(warm.address, retry_seconds=5.0)
    c.wait_ready(timeout=10.0)
    try:
        yield c
    finally:
        c.close()


def wait_until(check: Callable[[], bool], seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)


def containers_of(instance: str) -> list[str]:
    out = docker("ps", "-aq", "--no-trunc", "--filter", f"label={LABEL_INSTANCE}={instance}")
    return out.stdout.split()


def pool_ready(svc: Service) -> bool:
    pool = svc.core.manager.pool
    assert pool is not None
    return pool.stats()["ready"] >= 1


def warm_preloads_ended(svc: Service) -> bool:
    """Whether the pool has seen the end of every warm sandbox's preload command."""
    pool = svc.core.manager.pool
    assert pool is not None
    records = [r for queue in pool._ready.values() for r in queue]
    return bool(records) and all(r.preload is not None and r.preload.ended() for r in records)


def attach(client: SandboxClient, box: Sandbox, stdin: bytes) -> tuple[bytes, ExecResult]:
    out = bytearray()
    result = client.exec(
        box.id, [], stdin=stdin, attach_preload=True, on_output=lambda _, d: out.extend(d)
    )
    return bytes(out), result


def test_a_second_create_of_the_same_request_is_warm_and_its_preload_answers(
    warm: Service, warm_client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    request = SandboxRequest(limits=limits_factory(), preload_argv=PRELOAD, ttl_seconds=120)
    first = warm_client.create_sandbox(request)
    try:
        assert not first.from_pool  # nothing was warm yet: this miss starts the pool
        assert first.preloaded
        assert wait_until(lambda: pool_ready(warm)), "the pool never warmed a sandbox"
        second = warm_client.create_sandbox(request)
        try:
            assert second.from_pool and second.preloaded, second
            # Output the preload wrote before anyone attached arrives, then the answer.
            out, result = attach(warm_client, second, b"hello\n")
            assert result.verdict == "ok", result
            assert out == b"ready\nHELLO\n\n", out
            # The preload is attached to once; the sandbox itself stays usable.
            with pytest.raises(errors.FailedPrecondition, match="no preloaded command waiting"):
                attach(warm_client, second, b"")
        finally:
            warm_client.destroy_sandbox(second.id)
        out, result = attach(warm_client, first, b"cold\n")
        assert (result.verdict, out) == ("ok", b"ready\nCOLD\n\n")
    finally:
        warm_client.destroy_sandbox(first.id)


def test_a_warm_sandbox_whose_preload_died_is_not_handed_out(
    warm: Service, warm_client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    preload = ["sh", "-c", "sleep 600; echo survived"]
    request = SandboxRequest(limits=limits_factory(), preload_argv=preload, ttl_seconds=120)
    first = warm_client.create_sandbox(request)
    try:
        assert wait_until(lambda: pool_ready(warm)), "the pool never warmed a sandbox"
        (stale,) = set(containers_of(warm.config.instance_id)) - {first.container_id}
        killed = docker("exec", stale, "sh", "-c", "kill $(pidof sleep)")
        assert killed.returncode == 0, killed.stderr
        # The service learns of the end from the exec's output stream; a create in the
        # instant between the kill and that end is a race no check can close.
        assert wait_until(lambda: warm_preloads_ended(warm)), "the pool never saw the end"
        second = warm_client.create_sandbox(request)
        try:
            assert not second.from_pool, "a warm sandbox without its preload was handed out"
            assert second.container_id != stale
            assert wait_until(lambda: stale not in containers_of(warm.config.instance_id))
        finally:
            warm_client.destroy_sandbox(second.id)
    finally:
        warm_client.destroy_sandbox(first.id)


def test_each_exec_reports_its_own_peak_memory(
    client: SandboxClient, make_sandbox: Callable[..., Sandbox]
) -> None:
    box = make_sandbox()  # 128 MiB
    out = bytearray()
    grab = client.exec(
        box.id, ["python3", "-c", "b = bytearray(80 << 20); b[::4096] = b'x' * len(b[::4096])"],
        on_output=lambda _, d: out.extend(d),
    )  # fmt: skip
    assert grab.verdict == "ok", (grab, out)
    assert grab.peak_memory_bytes >= 80 * MiB, grab
    small = client.exec(box.id, ["true"])
    assert small.verdict == "ok", small
    # The second exec starts from a reset peak: it must not report the first one's 80 MiB.
    assert 0 < small.peak_memory_bytes < 40 * MiB, small
