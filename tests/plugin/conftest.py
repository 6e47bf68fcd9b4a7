"""Plugin tests drive real pytest runs against an embedded sandboxd and real Docker.

Other plugin sessions may run on the same engine at the same time (other suites, other
users), so a test looks only at containers of this session's service instances (their
ids start with its prefix) that appeared while it ran, and counts as left behind only
those whose service instance is gone: a live instance is a session still running, not
one of ours that forgot to clean up. Without the prefix, a concurrent suite's test took
another suite's sandbox kept by `--sandbox-keep-failed` for its own leftover and removed
it (both tests then failed).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from sandboxd import instances
from sandboxd.engine.base import LABEL_INSTANCE, LABEL_MANAGED
from tests.conftest import SESSION_PREFIX

# Every container the plugin makes carries this (user label) besides the service's own.
SESSION_LABEL = "user.pytest-sandbox.session"


def plugin_containers() -> dict[str, str]:
    """{container id: service instance id} of this test session's plugin containers."""
    out = subprocess.run(
        [
            "docker",
            "ps",
            "-a",
            "--filter",
            f"label={LABEL_MANAGED}",
            "--filter",
            f"label={SESSION_LABEL}",
            "--format",
            f'{{{{.ID}}}} {{{{.Label "{LABEL_INSTANCE}"}}}}',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    pairs = (line.split(maxsplit=1) for line in out.stdout.splitlines() if line.strip())
    return {p[0]: p[1] for p in pairs if len(p) > 1 and p[1].startswith(SESSION_PREFIX)}


class Containers:
    """Plugin containers that appeared after this test began."""

    def __init__(self) -> None:
        self._before = set(plugin_containers())

    def new(self) -> list[str]:
        return [c for c in plugin_containers() if c not in self._before]

    def left(self) -> list[str]:
        """New ones whose service has stopped: what a finished session left behind."""
        now = plugin_containers()
        return [c for c, owner in now.items() if c not in self._before and not _alive(owner)]


def _alive(instance_id: str) -> bool:
    return bool(instance_id) and instances.is_alive(instance_id)


@pytest.fixture
def containers() -> Containers:
    return Containers()


@pytest.fixture
def no_leftovers(containers: Containers) -> Iterator[None]:
    """Fails the test if a sandbox container of its plugin sessions outlives them."""
    yield
    left = containers.left()
    if left:
        subprocess.run(["docker", "rm", "-f", *left], capture_output=True)
    assert not left, f"containers left behind: {left}"
