"""Shared fixtures: one real sandboxd per session, the base image, and the leftover check.

Every service instance a test starts should take its id from `new_instance_id` (or the
`instance_id_factory` fixture): the ids share this session's prefix, and at the end of
the session no container labelled with one of them may be left behind.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandboxd.api import Sandbox, SandboxRequest, requested_limits
from sandboxd.client import SandboxClient
from sandboxd.config import ServerConfig
from sandboxd.engine.base import LABEL_INSTANCE, LABEL_MANAGED
from sandboxd.images import LABEL_BUILDER
from sandboxd.limits import Limits, MiB
from sandboxd.server import Service, create_server

BASE_IMAGE = "sandbox-base:bookworm"
#: Every instance id made by this test session starts with this.
SESSION_PREFIX = "t" + uuid.uuid4().hex[:5]
# Services this session starts in child processes (pytester runs, the CLI) without an
# explicit id get this prefix too, so the checks below see them and only them.
os.environ["SANDBOXD_INSTANCE_PREFIX"] = SESSION_PREFIX
# No address means a service embedded in the one process, not the per-user daemon: the
# suite must leave no daemon behind (tests/plugin/test_daemon.py starts its own).
os.environ["SANDBOXD_EMBEDDED"] = "1"
_serial = itertools.count()
_used_docker = False


def new_instance_id() -> str:
    """A service instance id that the session-end check will account for."""
    global _used_docker
    _used_docker = True
    return f"{SESSION_PREFIX}{next(_serial):04d}"


def docker(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI; the caller checks the result."""
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def session_containers() -> list[tuple[str, str, str]]:
    """(id, name, instance) of labelled containers made by this session's instances."""
    out = docker(
        "ps",
        "-a",
        "--filter",
        f"label={LABEL_MANAGED}",
        "--format",
        f'{{{{.ID}}}} {{{{.Names}}}} {{{{.Label "{LABEL_INSTANCE}"}}}}',
    )
    assert out.returncode == 0, f"docker ps failed: {out.stderr.strip()}"
    rows = [tuple(line.split(" ", 2)) for line in out.stdout.splitlines() if line.strip()]
    return [r for r in rows if len(r) == 3 and r[2].startswith(SESSION_PREFIX)]  # type: ignore[misc]


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


@pytest.fixture(scope="session", autouse=True)
def _no_labelled_container_left() -> Iterator[None]:
    """After the session, no container of this session's service instances may be left."""
    yield
    if not _used_docker:
        return  # nothing in this session talked to the engine
    # Removal is asynchronous in the service: give it a few seconds to finish.
    wait_for(lambda: not session_containers(), timeout=15.0, interval=0.5)
    left = session_containers()
    for cid, _, _ in left:
        docker("rm", "-f", cid)  # clean up so the next run starts clean, then report
    assert not left, f"labelled containers left behind by this test session: {left}"


def session_images() -> set[str]:
    """Ids of the images built by this session's service instances (their builder label).

    Another process's images are never among them, even when built during this session.
    """
    out = docker(
        "images",
        "--no-trunc",
        "--filter",
        f"label={LABEL_BUILDER}",
        "--format",
        f'{{{{.ID}}}} {{{{.Label "{LABEL_BUILDER}"}}}}',
    )
    rows = (line.split(" ", 1) for line in out.stdout.splitlines() if line.strip())
    return {r[0] for r in rows if len(r) == 2 and r[1].startswith(SESSION_PREFIX)}


@pytest.fixture(scope="session", autouse=True)
def _remove_images_this_session_built() -> Iterator[None]:
    """The suite builds dozens of images (every pytester project is one); the build
    cache is for users, so the session removes what its own services built."""
    yield
    if os.environ.get("SANDBOX_TEST_KEEP_IMAGES"):
        return  # SANDBOX_TEST_KEEP_IMAGES: keep them, e.g. to reuse them in the next run
    try:
        for image in sorted(session_images()):
            docker("rmi", "-f", image)
    except (OSError, subprocess.SubprocessError):
        pass  # a cleanup failing must not fail the session


@pytest.fixture(scope="session")
def instance_id_factory() -> Callable[[], str]:
    """Factory for service instance ids covered by the session-end leftover check."""
    return new_instance_id


@pytest.fixture(scope="session")
def base_image() -> str:
    """The offline base image; FAILS (never skips) when it is missing."""
    info = docker("info", "--format", "{{.ServerVersion}}")
    if info.returncode != 0:
        pytest.fail(
            f"the Docker engine does not answer ({info.stderr.strip()}); "
            "run scripts/host-setup.sh to install and start it",
            pytrace=False,
        )
    image = docker("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE)
    if image.returncode != 0:
        pytest.fail(
            f"base image {BASE_IMAGE} is missing; make it with `sandboxd bootstrap-image` "
            "(scripts/host-setup.sh does)",
            pytrace=False,
        )
    return BASE_IMAGE


@pytest.fixture(scope="session")
def requirements_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """XDG_CACHE_HOME for plugin sessions with `sandbox_requirements`: pip installs each
    requirements file once per test session, and nothing lands in the user's own cache."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture
def minimal_environment(
    requirements_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Path], None]:
    """`minimal_environment(project)`: the project's sandbox environment is pytest alone.

    For tests of something other than mirroring (the daemon's reuse, cluster placement):
    mirroring this virtualenv means hundreds of MiB (ray alone is 240), and a session that
    must build its environment (on a fresh engine, or under a fragment of its own, which
    goes below the environment) spends one to two minutes on it; pytest alone takes seconds.
    """
    monkeypatch.setenv("XDG_CACHE_HOME", str(requirements_cache))

    def use(project: Path) -> None:
        ini = project / "pytest.ini"
        assert not ini.exists(), f"{ini} exists: add sandbox_requirements to it instead"
        ini.write_text("[pytest]\nsandbox_requirements = requirements.txt\n")
        # Empty: the plugin adds pytest itself, at the host's version.
        (project / "requirements.txt").write_text("")

    return use


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    """A short private directory: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sbxt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(**overrides: object) -> ServerConfig:
    """A config for tests: this session's instance id, no warm pool, a quiet reaper.

    The reaper is quiet so that only the start of a new instance, which the restart test
    checks, removes what a killed one left.
    """
    settings: dict[str, object] = {
        "instance_id": new_instance_id(),
        "reap_interval_seconds": 3600.0,
        "pool_max_per_key": 0,
        "admission_timeout_seconds": 10.0,
    }
    settings.update(overrides)
    return ServerConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def config_factory() -> Callable[..., ServerConfig]:
    """Factory: `config_factory(**overrides)` for tests that start their own service."""
    return make_config


@pytest.fixture(scope="session")
def waiter() -> Callable[..., bool]:
    """`wait_for(predicate, timeout)`, for test directories whose own conftest shadows this one."""
    return wait_for


@pytest.fixture(scope="session")
def limits_factory() -> Callable[..., Limits]:
    """Factory: `limits_factory(**overrides)`, small limits for a 2-core machine."""
    return small_limits


@pytest.fixture(scope="session")
def service(base_image: str, short_tmp: Path) -> Iterator[Service]:
    """One real sandboxd for the whole session, on a unix socket."""
    svc, _ = create_server(make_config(), f"unix:{short_tmp}/sandboxd.sock")
    try:
        yield svc
    finally:
        svc.stop(grace=2.0)


@pytest.fixture(scope="session")
def client(service: Service) -> Iterator[SandboxClient]:
    """A client of the session's service, through a real channel."""
    c = SandboxClient(service.address, retry_seconds=5.0)
    c.wait_ready(timeout=10.0)
    try:
        yield c
    finally:
        c.close()


def small_limits(**overrides: object) -> Limits:
    """Limits small enough for many sandboxes on a 2-core CI machine."""
    values: dict[str, object] = {
        "cpus": 1.0,
        "memory_bytes": 128 * MiB,
        "pids": 64,
        "scratch_bytes": 16 * MiB,
        "timeout_seconds": 20.0,
    }
    values.update(overrides)
    return requested_limits(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_sandbox(client: SandboxClient) -> Iterator[Callable[..., Sandbox]]:
    """Factory: create a sandbox (small limits by default); every one is destroyed after."""
    made: list[str] = []

    def make(image: str = "", limits: Limits | None = None, **spec: object) -> Sandbox:
        box = client.create_sandbox(
            SandboxRequest(image=image, limits=limits or small_limits(), **spec)  # type: ignore[arg-type]
        )
        made.append(box.id)
        return box

    yield make
    for sandbox_id in made:
        client.destroy_sandbox(sandbox_id)


@pytest.fixture
def sandbox(make_sandbox: Callable[..., Sandbox]) -> Sandbox:
    """One fresh sandbox on the base image with small limits."""
    return make_sandbox()
