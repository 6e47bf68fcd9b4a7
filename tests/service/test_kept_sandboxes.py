"""A sandbox kept for inspection outlives its service, spared by every other service's
reaper until its own TTL, and is removed after it.

Other suites on this engine run services of their own, some of them older than the keep
mark; such a service removes a kept sandbox of a dead instance as soon as it starts. So
the test watches what its own services remove (each has an engine that records it)
rather than only whether the container is still there.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandboxd import reaping
from sandboxd.api import SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.config import ServerConfig
from sandboxd.engine.docker import DockerEngine
from sandboxd.server import Service, create_server

pytestmark = pytest.mark.docker

#: Long enough for the passes below to run before it ends on a loaded machine.
TTL = 20.0


class RecordingEngine(DockerEngine):
    """The Docker engine, noting every container its service removes, and when."""

    def __init__(self) -> None:
        super().__init__()
        self.removed: list[str] = []
        self.removed_at: dict[str, float] = {}

    def remove_container(self, container_id: str) -> None:
        self.removed.append(container_id)
        self.removed_at.setdefault(container_id, time.time())
        super().remove_container(container_id)


def inspect(container_id: str, field: str) -> str | None:
    """A field of the container (`docker inspect --format`), None once it is gone."""
    out = subprocess.run(
        ["docker", "inspect", "--format", field, container_id],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip().lstrip("/") if out.returncode == 0 else None


@pytest.fixture
def services(
    config_factory: Callable[..., ServerConfig], short_tmp: Path, base_image: str
) -> Iterator[Callable[[str], tuple[Service, RecordingEngine]]]:
    """Factory: start a service of its own, with the engine that records its removals."""
    started: list[Service] = []

    def start(name: str) -> tuple[Service, RecordingEngine]:
        engine = RecordingEngine()
        svc, _ = create_server(config_factory(), f"unix:{short_tmp}/{name}.sock", engine)
        started.append(svc)
        return svc, engine

    yield start
    for svc in started:
        svc.stop(grace=2.0)


def test_a_kept_sandbox_survives_other_reapers_until_its_ttl(
    services: Callable[[str], tuple[Service, RecordingEngine]],
) -> None:
    first, _ = services("first")
    other, other_engine = services("other")
    with SandboxClient(first.address, retry_seconds=5.0) as c:
        c.wait_ready(timeout=20)
        kept = c.create_sandbox(SandboxRequest(ttl_seconds=TTL))
    cid = kept.container_id
    try:
        first.stop(grace=2.0, keep=[kept.id])
        assert inspect(cid, "{{.State.Running}}") == "true", "kept sandbox went with its service"
        name = inspect(cid, "{{.Name}}") or ""
        until = reaping.kept_until(name)
        assert until is not None, f"{name!r} carries no keep mark"
        assert until == pytest.approx(kept.expires_unix, abs=1)

        # Passes of another live service, the start of one that begins after the first
        # has ended and its passes all spare it until its TTL; so would a foreign sweep.
        later, later_engine = services("later")
        while time.time() < until:
            other.core.manager.reap_orphans()
            later.core.manager.reap_orphans()
            taken = reaping.LeftoverRule("foreign").find(later.core.engine, time.time())
            assert time.time() >= until or cid not in {i.id for i in taken}
            time.sleep(0.5)
        # A pass begun just before the TTL may end after it and remove it then, rightly:
        # what counts is when a removal came.
        early = [
            at for engine in (other_engine, later_engine) if (at := engine.removed_at.get(cid))
        ]
        assert all(at >= until for at in early), f"removed {until - min(early):.2f}s before its TTL"

        # Once its TTL has passed, the next pass of a service started later removes it
        # (unless an older service on this engine already has).
        later.core.manager.reap_orphans()
        assert cid in later_engine.removed or inspect(cid, "{{.Name}}") is None
        assert inspect(cid, "{{.Name}}") is None
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, check=False)
