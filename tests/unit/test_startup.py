"""What a session does before its first routed test: the work begun at configure time,
and the shortcut that builds on an earlier session's environment image."""

from __future__ import annotations

import gc
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import startup as startup_module
from pytest_sandbox.runner import ImageCache
from pytest_sandbox.snapshot import Snapshot
from pytest_sandbox.spec import Defaults, resolve
from pytest_sandbox.startup import Startup, freeze_heap
from sandboxd.api import BuildResult, Image
from sandboxd.connection import Connection


class FakeBuilds:
    """A client whose builds are content-addressed by (base, fragment), as the service's."""

    def __init__(self, resolved_base: str = "base-id-1") -> None:
        self.resolved_base = resolved_base
        self.calls: list[tuple[str, str]] = []

    def build_image(self, fragment: str, *, base: str = "", **_: Any) -> BuildResult:
        self.calls.append((base, fragment))
        key = hashlib.sha256(f"{base or self.resolved_base}\0{fragment}".encode()).hexdigest()
        return BuildResult(Image(key=key, digest="", tag=f"img:{key[:12]}", base=base), True, 0)


def site_with_one_distribution(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    info = site / "demo-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (site / "demo.py").write_text("X = 1\n")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
    (info / "RECORD").write_text("demo.py,,\ndemo-1.0.dist-info/METADATA,,\n")
    return site


def session(tmp_path: Path, client: FakeBuilds) -> ImageCache:
    site = site_with_one_distribution(tmp_path)
    snap = Snapshot(context={}, has_src=False, env_fingerprint="fp", env_source=(tmp_path, (site,)))
    return ImageCache(client, snap)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_a_second_session_builds_the_project_on_the_recorded_environment(
    tmp_path: Path,
) -> None:
    spec = resolve({}, Defaults(), {})
    first = FakeBuilds()
    project = session(tmp_path, first).get(spec)
    assert len(first.calls) == 3  # the chain's first image, the environment, the project

    second = FakeBuilds()
    assert session(tmp_path, second).get(spec) == project
    assert len(second.calls) == 2  # no environment read: its first image, then the project
    assert second.calls[1][0] == first.calls[2][0]


def test_a_service_whose_base_resolves_otherwise_builds_the_whole_chain(
    tmp_path: Path,
) -> None:
    spec = resolve({}, Defaults(), {})
    session(tmp_path, FakeBuilds("base-id-1")).get(spec)
    other = FakeBuilds("base-id-2")  # the same marker, another default base image
    session(tmp_path, other).get(spec)
    assert len(other.calls) == 3


class FakeConnection(Connection):
    def __init__(self) -> None:
        self.closed = False

    def close(self, **_: Any) -> None:
        self.closed = True


def test_startup_hands_the_connection_to_the_session_even_when_the_snapshot_fails() -> None:
    conn = FakeConnection()
    prepared: list[object] = []

    def take() -> Snapshot:
        raise OSError("unreadable project")

    startup = Startup(take, lambda: conn, lambda c, s: prepared.append(s))
    with pytest.raises(OSError, match="unreadable project"):
        startup.ready()
    assert startup.connection() is conn  # for the session to close
    assert prepared == []


def test_startup_prepares_once_both_are_there() -> None:
    conn = FakeConnection()
    snap = Snapshot(context={}, has_src=False)
    prepared: list[tuple[object, object]] = []
    startup = Startup(lambda: snap, lambda: conn, lambda c, s: prepared.append((c, s)))
    assert startup.ready() == (snap, conn)
    assert prepared == [(conn, snap)]


def test_the_heap_is_frozen_twice_in_the_first_session_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(startup_module, "_frozen", threading.Event())
    try:
        freeze_heap(last=False)  # configured
        first = gc.get_freeze_count()
        assert first > 0
        made_later = [[n] for n in range(1000)]  # the client side's imports, say
        freeze_heap(last=True)
        assert gc.get_freeze_count() >= first + len(made_later)
        after = gc.get_freeze_count()
        made_by_a_second_session = [[n] for n in range(1000)]
        freeze_heap(last=False)
        freeze_heap(last=True)
        assert gc.get_freeze_count() < after + len(made_by_a_second_session)
    finally:
        gc.unfreeze()
