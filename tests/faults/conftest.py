"""Fault tests: a `sandboxd serve` child the tests kill, signal and starve of its engine.

The engine-outage module is ordered last in the session: it stops dockerd, and every
other test needs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "load"))

from sandboxd_process import BASE_IMAGE, SandboxdProcess

LAST = "test_fault_zz_engine_outage.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the engine-outage tests to the very end of the whole session."""
    items.sort(key=lambda item: item.path.name == LAST)


@pytest.fixture(scope="session", autouse=True)
def _engine_and_base_image() -> None:
    """Fail (never skip) with a clear message when the engine or the base image is missing."""
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    assert info.returncode == 0, f"the Docker engine does not answer: {info.stderr.strip()}"
    image = subprocess.run(
        ["docker", "image", "inspect", BASE_IMAGE], capture_output=True, check=False
    )
    assert image.returncode == 0, (
        f"base image {BASE_IMAGE} is missing; run `sandboxd bootstrap-image` first"
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandboxd(short_dir: Path) -> Iterator[Callable[..., SandboxdProcess]]:
    """Factory: `sandboxd(settings, grace=..)` starts a child; all are ended at teardown."""
    started: list[SandboxdProcess] = []

    def start(settings: dict[str, Any] | None = None, **kwargs: Any) -> SandboxdProcess:
        defaults = {"pool_max_per_key": 0, "reap_interval_seconds": 1.0}
        proc = SandboxdProcess(
            short_dir, {**defaults, **(settings or {})}, name=f"sbx{len(started)}", **kwargs
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.close()
