"""Fixtures for load tests: a `sandboxd serve` child in a short-pathed private directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sandboxd_process import BASE_IMAGE, SandboxdProcess

pytestmark = pytest.mark.docker


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
        proc = SandboxdProcess(short_dir, settings, name=f"sbx{len(started)}", **kwargs)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.close()
