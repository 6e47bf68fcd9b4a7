"""Plugin tests drive real pytest runs against an embedded sandboxd and real Docker."""

from __future__ import annotations

import subprocess

import pytest

# Every container the plugin makes carries this (user label) besides the service's own.
SESSION_LABEL = "user.pytest-sandbox.session"


def plugin_containers() -> list[str]:
    out = subprocess.run(
        [
            "docker",
            "ps",
            "-aq",
            "--filter",
            "label=sandbox.managed",
            "--filter",
            f"label={SESSION_LABEL}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


@pytest.fixture(name="plugin_containers")
def plugin_containers_fixture() -> object:
    return plugin_containers


@pytest.fixture
def no_leftovers() -> object:
    """Fails the test if any sandbox container of a plugin session outlives it."""
    yield
    left = plugin_containers()
    if left:
        subprocess.run(["docker", "rm", "-f", *left], capture_output=True)
    assert not left, f"containers left behind: {left}"
