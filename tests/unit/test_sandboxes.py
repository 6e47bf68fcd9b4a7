from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from fake_engine import BASE, FakeEngine, eventually

from sandboxd import instances
from sandboxd.admission import call_deadline, wait_limit
from sandboxd.config import ServerConfig
from sandboxd.engine.base import (
    LABEL_EXPIRES,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_SANDBOX,
    ContainerSpec,
)
from sandboxd.errors import (
    EngineUnavailable,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SandboxError,
)
from sandboxd.images import ImageStore
from sandboxd.limits import Caps, Limits, MiB
from sandboxd.sandboxes import SandboxManager, SandboxRequest, check_env


def new_id() -> str:
    return "unit" + uuid.uuid4().hex[:8]


def make_manager(engine: FakeEngine, **kw: object) -> SandboxManager:
    """A manager without a warm pool, so every create is one container."""
    settings: dict[str, object] = {"reap_interval_seconds": 3600.0, "pool_max_per_key": 0}
    settings.update(kw)
    config = ServerConfig(instance_id=new_id(), **settings)  # type: ignore[arg-type]
    return SandboxManager(config, engine, ImageStore(engine, BASE))


@pytest.fixture
def manager(engine: FakeEngine) -> Iterator[SandboxManager]:
    m = make_manager(engine)
    m.start()
    try:
        yield m
    finally:
        m.stop()


def test_create_gives_a_locked_down_labelled_container(
    manager: SandboxManager, engine: FakeEngine
) -> None:
    record = manager.create(
        SandboxRequest(
            limits=Limits(cpus=0.5, memory_bytes=64 * MiB, pids=32, scratch_bytes=8 * MiB),
            env={"FOO": "bar"},
            labels={"team": "ci"},
            ttl_seconds=60.0,
        )
    )
    spec = engine.containers[record.container_id].spec
    assert spec.image == BASE
    assert spec.read_only and not spec.network
    assert spec.user == "1000:1000"
    assert spec.nano_cpus == 500_000_000
    assert (spec.memory_bytes, spec.pids) == (64 * MiB, 32)
    assert spec.scratch == {"/tmp": 8 * MiB, "/sandbox/work": 8 * MiB}
    assert spec.env["FOO"] == "bar" and spec.env["HOME"] == "/sandbox/work"
    assert spec.labels[LABEL_MANAGED] == "1"
    assert spec.labels[LABEL_INSTANCE] == manager.config.instance_id
    assert spec.labels[LABEL_SANDBOX] == record.id
    assert spec.labels["user.team"] == "ci"
    assert abs(record.expires_unix - (time.time() + 60)) < 5
    # The label bounds the life of a container whatever happens to this instance.
    assert float(spec.labels[LABEL_EXPIRES]) <= time.time() + manager.config.caps.ttl_seconds + 5
    assert spec.runtime is None  # runc is the engine's default
    assert manager.get(record.id) is record
    assert [r.id for r in manager.list()] == [record.id]


@pytest.mark.parametrize(
    ("request_", "kind", "why"),
    [
        (SandboxRequest(limits=Limits(memory_bytes=-1)), InvalidArgument, "limits.memory_bytes"),
        (SandboxRequest(limits=Limits(pids=10**6)), InvalidArgument, "cap of 4096"),
        (SandboxRequest(ttl_seconds=10**9), InvalidArgument, "spec.ttl_seconds"),
        (SandboxRequest(env={"1BAD": "x"}), InvalidArgument, "spec.env"),
        (SandboxRequest(env={"A": "x\x00"}), InvalidArgument, "NUL byte"),
        (SandboxRequest(labels={"-bad": "x"}), InvalidArgument, "spec.labels"),
        (SandboxRequest(workdir="relative"), InvalidArgument, "spec.workdir"),
        (SandboxRequest(workdir="/a/../etc"), InvalidArgument, "spec.workdir"),
        (SandboxRequest(runtime="kata"), InvalidArgument, "spec.runtime: 'kata' is not registered"),
        (SandboxRequest(profile="untrusted"), PermissionDenied, "needs runtime 'runsc'"),
        (SandboxRequest(profile="nope"), InvalidArgument, "unknown profile"),
        (SandboxRequest(image="missing:tag"), NotFound, "missing:tag"),
    ],
)
def test_bad_requests_are_refused_before_any_container(
    manager: SandboxManager,
    engine: FakeEngine,
    request_: SandboxRequest,
    kind: type[Exception],
    why: str,
) -> None:
    with pytest.raises(kind, match=why):
        manager.create(request_)
    assert engine.containers == {}


def test_check_env_bounds() -> None:
    assert check_env({"A": "1"}) == {"A": "1"}
    with pytest.raises(InvalidArgument, match=r"above the limit of 256"):
        check_env({f"V{i}": "" for i in range(300)})
    with pytest.raises(InvalidArgument, match=r"bytes in all"):
        check_env({"BIG": "x" * 200_000})


def test_admission_refuses_past_the_cap_with_a_retry_hint(engine: FakeEngine) -> None:
    m = make_manager(engine, caps=Caps(sandboxes=2), admission_timeout_seconds=0.2)
    m.start()
    try:
        first = m.create(SandboxRequest())
        m.create(SandboxRequest())
        with pytest.raises(ResourceExhausted, match=r"all 2 sandbox slots") as info:
            m.create(SandboxRequest())
        assert info.value.retry_after is not None
        assert len(engine.containers) == 2
        m.destroy(first.id)
        m.create(SandboxRequest())
        assert eventually(lambda: len(engine.containers) == 2)
    finally:
        m.stop()


def test_a_create_waits_for_a_slot_no_longer_than_its_call_deadline(engine: FakeEngine) -> None:
    m = make_manager(engine, caps=Caps(sandboxes=1), admission_timeout_seconds=60.0)
    m.start()
    try:
        m.create(SandboxRequest())
        with call_deadline(1.0):
            assert wait_limit(60.0) <= 1.0
            with pytest.raises(ResourceExhausted, match=r"all 1 sandbox slots") as info:
                m.create(SandboxRequest())
        assert info.value.retry_after is not None
        assert wait_limit(60.0) == 60.0  # outside the call, the admission timeout again
        with call_deadline(None):
            assert wait_limit(60.0) == 60.0
    finally:
        m.stop()


def test_a_waiting_create_is_admitted_when_a_slot_frees(engine: FakeEngine) -> None:
    m = make_manager(engine, caps=Caps(sandboxes=1), admission_timeout_seconds=10.0)
    m.start()
    try:
        first = m.create(SandboxRequest())
        got: list[str] = []
        waiter = threading.Thread(target=lambda: got.append(m.create(SandboxRequest()).id))
        waiter.start()
        time.sleep(0.2)
        assert got == []
        m.destroy(first.id)
        waiter.join(timeout=5)
        assert len(got) == 1
    finally:
        m.stop()


def test_ttl_reap_destroys_expired_sandboxes_only(
    manager: SandboxManager, engine: FakeEngine
) -> None:
    short = manager.create(SandboxRequest(ttl_seconds=0.05))
    long = manager.create(SandboxRequest(ttl_seconds=600))
    time.sleep(0.1)
    assert manager.reap_expired() == 1
    assert eventually(lambda: short.container_id not in engine.containers)
    assert long.container_id in engine.containers
    with pytest.raises(NotFound):
        manager.get(short.id)


def test_the_reaper_thread_reaps_without_a_client(engine: FakeEngine) -> None:
    m = make_manager(engine, reap_interval_seconds=0.05)
    m.start()
    try:
        record = m.create(SandboxRequest(ttl_seconds=0.1))
        assert eventually(lambda: record.container_id not in engine.containers)
    finally:
        m.stop()


def _labels(instance: str, expires: float | None = None, sandbox: str = "s1") -> dict[str, str]:
    labels = {LABEL_MANAGED: "1", LABEL_INSTANCE: instance, LABEL_SANDBOX: sandbox}
    if expires is not None:
        labels[LABEL_EXPIRES] = f"{expires:.0f}"
    return labels


def test_orphan_reap_removes_containers_of_dead_instances(engine: FakeEngine) -> None:
    dead = engine.add_container(_labels(new_id(), time.time() + 3600))
    unlabelled = engine.add_container({"other": "1"})
    m = make_manager(engine)
    m.start()  # start reaps
    try:
        assert dead not in engine.containers
        assert unlabelled in engine.containers
    finally:
        m.stop()


def test_orphan_reap_spares_live_instances_until_their_ttl(engine: FakeEngine) -> None:
    other = instances.InstanceLock(new_id())
    other.acquire()
    try:
        alive = engine.add_container(_labels(other.instance_id, time.time() + 3600))
        expired = engine.add_container(_labels(other.instance_id, time.time() - 10))
        m = make_manager(engine)
        m.start()
        try:
            assert alive in engine.containers
            assert expired not in engine.containers
        finally:
            m.stop()
    finally:
        other.release()
    m = make_manager(engine)
    assert m.reap_orphans() == 1  # its instance is gone now
    assert alive not in engine.containers


def test_orphan_reap_removes_our_forgotten_containers_but_not_fresh_ones(
    manager: SandboxManager, engine: FakeEngine
) -> None:
    ours = manager.config.instance_id
    known = manager.create(SandboxRequest())
    forgotten = engine.add_container(_labels(ours, sandbox="gone"), created_unix=time.time() - 600)
    fresh = engine.add_container(_labels(ours, sandbox="new"), created_unix=time.time())
    assert manager.reap_orphans() == 1
    assert forgotten not in engine.containers
    assert fresh in engine.containers
    assert known.container_id in engine.containers


def test_stop_destroys_everything_and_releases_the_instance(engine: FakeEngine) -> None:
    m = make_manager(engine)
    m.start()
    assert instances.is_alive(m.config.instance_id)
    m.create(SandboxRequest())
    m.create(SandboxRequest())
    m.stop()
    assert engine.containers == {}  # stop waits for the removals
    assert not instances.is_alive(m.config.instance_id)


def test_destroy_with_the_engine_down_forgets_and_leaves_it_to_the_reaper(
    manager: SandboxManager, engine: FakeEngine
) -> None:
    record = manager.create(SandboxRequest())
    engine.down = True
    manager.destroy(record.id)  # removal is in the background and meets the lost engine
    assert eventually(lambda: engine.failed_removals > 0)
    engine.down = False
    assert record.container_id in engine.containers
    with pytest.raises(NotFound):
        manager.get(record.id)
    engine.containers[record.container_id].created_unix = time.time() - 600
    assert manager.reap_orphans() == 1
    assert record.container_id not in engine.containers


def test_create_with_the_engine_down_frees_its_slot(engine: FakeEngine) -> None:
    m = make_manager(engine, caps=Caps(sandboxes=1), admission_timeout_seconds=0.1)
    m.start()
    try:
        m._runtimes = {"runc"}
        image_ok = m.images.resolve_ref("")
        assert image_ok[0] == BASE
        engine.down = True
        with pytest.raises(EngineUnavailable):
            m.create(SandboxRequest())
        engine.down = False
        m.create(SandboxRequest())  # the failed create did not keep the only slot
    finally:
        m.stop()


def test_owners_see_only_their_sandboxes(manager: SandboxManager) -> None:
    a = manager.create(SandboxRequest(owner="alice"))
    b = manager.create(SandboxRequest(owner="bob"))
    assert [r.id for r in manager.list("alice")] == [a.id]
    assert {r.id for r in manager.list()} == {a.id, b.id}
    with pytest.raises(PermissionDenied, match=r"belongs to another client"):
        manager.get(b.id, "alice")
    with pytest.raises(PermissionDenied):
        manager.destroy(b.id, "alice")
    manager.destroy(b.id, "bob")


def test_unknown_sandbox_is_not_found(manager: SandboxManager) -> None:
    with pytest.raises(NotFound, match=r"no sandbox 'nope'"):
        manager.get("nope")
    with pytest.raises(NotFound):
        manager.destroy("nope")


def test_reap_foreign_removes_live_instances_sandboxes_at_start_only_when_set(
    engine: FakeEngine,
) -> None:
    other = instances.InstanceLock(new_id())
    other.acquire()
    try:
        theirs = engine.add_container(_labels(other.instance_id, time.time() + 3600))
        m = make_manager(engine)  # reap_foreign is off by default
        m.start()
        m.stop()
        assert theirs in engine.containers
        m = make_manager(engine, reap_foreign=True)
        m.start()
        try:
            assert theirs not in engine.containers
            # Only the start reaps foreign sandboxes; later passes spare live instances.
            again = engine.add_container(_labels(other.instance_id, time.time() + 3600))
            assert m.reap_orphans() == 0
            assert again in engine.containers
        finally:
            m.stop()
    finally:
        other.release()


def test_destroy_gives_back_the_slot_and_the_memory(engine: FakeEngine) -> None:
    m = make_manager(engine, caps=Caps(sandboxes=1), admission_timeout_seconds=0.1)
    m.start()
    try:
        record = m.create(SandboxRequest(limits=Limits(memory_bytes=64 * MiB)))
        assert m.committed_memory() == 64 * MiB
        with pytest.raises(ResourceExhausted):
            m.create(SandboxRequest())
        m.destroy(record.id)
        with pytest.raises(NotFound):
            m.destroy(record.id)
        assert m.committed_memory() == 0
        m.create(SandboxRequest())
    finally:
        m.stop()


class _RefusingEngine(FakeEngine):
    """Answers every question but refuses to create containers."""

    def create_container(self, spec: ContainerSpec) -> str:
        raise SandboxError("the engine refused the container")


def test_a_failed_launch_gives_back_its_admission() -> None:
    engine = _RefusingEngine()
    engine.add_image(BASE)
    m = make_manager(engine, caps=Caps(sandboxes=1), admission_timeout_seconds=0.1)
    m.start()
    try:
        for _ in range(2):  # the second would find no slot if the first kept it
            with pytest.raises(SandboxError, match="refused the container"):
                m.create(SandboxRequest())
        assert m.committed_memory() == 0
    finally:
        m.stop()
