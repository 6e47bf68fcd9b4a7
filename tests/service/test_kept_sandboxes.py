"""A sandbox kept for inspection outlives its service, spared by every other service's
reaper until its own TTL, and is removed after it."""

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
from sandboxd.server import Service, create_server
from tests.conftest import wait_for

pytestmark = pytest.mark.docker

#: Long enough for the passes below to run before it ends on a loaded machine.
TTL = 20.0


def container_name(container_id: str) -> str | None:
    """The container's name, None once it is gone."""
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{.Name}}", container_id],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip().lstrip("/") if out.returncode == 0 else None


@pytest.fixture
def services(
    config_factory: Callable[..., ServerConfig], short_tmp: Path, base_image: str
) -> Iterator[Callable[[str], Service]]:
    """Factory: start a service of its own."""
    started: list[Service] = []

    def start(name: str) -> Service:
        svc, _ = create_server(config_factory(), f"unix:{short_tmp}/{name}.sock")
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop(grace=2.0)


def spared_by_a_foreign_sweep(svc: Service, container_id: str) -> bool:
    """Whether a pass that takes other live instances' sandboxes too would spare it.

    Asks the rule rather than running the pass: that would remove the sandboxes of every
    other service on this engine.
    """
    found = reaping.LeftoverRule("foreign").find(svc.core.engine, time.time())
    return all(info.id != container_id for info in found)


def test_a_kept_sandbox_survives_other_reapers_until_its_ttl(
    services: Callable[[str], Service],
) -> None:
    first = services("first")
    other = services("other")
    with SandboxClient(first.address, retry_seconds=5.0) as c:
        c.wait_ready(timeout=20)
        kept = c.create_sandbox(SandboxRequest(ttl_seconds=TTL))
    try:
        first.stop(grace=2.0, keep=[kept.id])
        name = container_name(kept.container_id)
        assert name is not None, "the kept sandbox went with its service"
        until = reaping.kept_until(name)
        assert until is not None, f"{name} carries no keep mark"

        # A pass of another live service, and the start of one that begins after the
        # first has ended, spare it; so would a foreign sweep.
        other.core.manager.reap_orphans()
        later = services("later")
        assert spared_by_a_foreign_sweep(later, kept.container_id)
        while time.time() < until:
            assert container_name(kept.container_id) == name, "removed before its time"
            later.core.manager.reap_orphans()
            time.sleep(1.0)

        # Its TTL has passed: the next pass of a service started later removes it.
        assert later.core.manager.reap_orphans() >= 1
        assert wait_for(lambda: container_name(kept.container_id) is None, timeout=30)
    finally:
        subprocess.run(["docker", "rm", "-f", kept.container_id], capture_output=True, check=False)
