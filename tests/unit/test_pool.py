"""The warm pool, on the fake engine: hand-outs, refills, shrinking, budgets, failures."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from fake_engine import BASE, FakeEngine, eventually

from sandboxd.config import DEFAULT_PROFILE, ServerConfig
from sandboxd.errors import EngineUnavailable, ResourceExhausted
from sandboxd.images import ImageStore
from sandboxd.limits import Limits, MiB
from sandboxd.models import Prepared, SandboxRecord
from sandboxd.pool import WarmPool
from sandboxd.sandboxes import SandboxManager, SandboxRequest


def start(engine: FakeEngine, **kw: object) -> SandboxManager:
    settings: dict[str, object] = {
        "reap_interval_seconds": 3600.0,
        "pool_max_per_key": 2,
        "pool_workers": 2,
        "pool_idle_seconds": 3600.0,
    }
    settings.update(kw)
    config = ServerConfig(instance_id="unit" + uuid.uuid4().hex[:8], **settings)  # type: ignore[arg-type]
    manager = SandboxManager(config, engine, ImageStore(engine, BASE))
    manager.start()
    return manager


@pytest.fixture
def manager(engine: FakeEngine) -> Iterator[SandboxManager]:
    m = start(engine)
    try:
        yield m
    finally:
        m.stop()


def ready(manager: SandboxManager) -> int:
    assert manager.pool is not None
    return manager.pool.stats()["ready"]


def test_a_miss_starts_warming_and_the_next_request_is_served_warm(
    manager: SandboxManager, engine: FakeEngine
) -> None:
    first = manager.create(SandboxRequest())
    assert not first.from_pool
    assert eventually(lambda: ready(manager) == 1)
    made = len(engine.containers)
    second = manager.create(SandboxRequest())
    assert second.from_pool
    assert second.id != first.id
    # Handing out did not create a container on the request's path; a refill follows.
    assert eventually(lambda: ready(manager) >= 1)
    assert len(engine.containers) >= made


def test_prewarm_warms_without_handing_out(manager: SandboxManager) -> None:
    manager.prewarm(SandboxRequest())
    assert manager.list() == []
    assert eventually(lambda: ready(manager) == 1)
    assert manager.create(SandboxRequest()).from_pool


def test_a_warm_sandbox_is_handed_out_once(manager: SandboxManager) -> None:
    manager.create(SandboxRequest())
    assert eventually(lambda: ready(manager) == 1)
    ids = [manager.create(SandboxRequest()).id for _ in range(6)]
    assert len(set(ids)) == 6


def test_different_requests_do_not_share_warm_containers(manager: SandboxManager) -> None:
    manager.create(SandboxRequest(env={"A": "1"}))
    assert eventually(lambda: ready(manager) == 1)
    other = manager.create(SandboxRequest(env={"A": "2"}))
    assert not other.from_pool
    assert other.request.env == {"A": "2"}


def test_idle_pools_shrink_to_zero(engine: FakeEngine) -> None:
    manager = start(engine)
    try:
        manager.create(SandboxRequest())
        assert eventually(lambda: ready(manager) == 1)
        assert manager.pool is not None
        removed = manager.pool.shrink_idle(now=time.monotonic() + 10_000)
        assert removed == 1
        assert ready(manager) == 0
        assert manager.pool.stats()["target"] == 0
    finally:
        manager.stop()


def test_stop_removes_warm_containers(engine: FakeEngine) -> None:
    manager = start(engine)
    live = manager.create(SandboxRequest())
    assert eventually(lambda: ready(manager) == 1)
    manager.stop()
    assert live.container_id not in engine.containers
    assert engine.containers == {}


def test_the_pool_stays_inside_the_memory_budget(engine: FakeEngine) -> None:
    # Room for three 100 MiB sandboxes in all: one live, so at most two warm.
    manager = start(
        engine,
        memory_budget_bytes=300 * MiB,
        pool_memory_budget_bytes=300 * MiB,
        pool_max_per_key=5,
    )
    try:
        req = SandboxRequest(limits=Limits(0, 100 * MiB, 0, 0, False, 0, 0))
        for _ in range(3):
            manager.create(req)  # misses grow the target past what fits
            for s in manager.list():
                manager.destroy(s.id)
        manager.create(req)
        time.sleep(0.3)
        assert manager.pool is not None
        assert manager.committed_memory() + manager.pool.warm_memory() <= 300 * MiB
    finally:
        manager.stop()


def test_live_requests_evict_warm_containers_of_other_requests(engine: FakeEngine) -> None:
    manager = start(
        engine,
        memory_budget_bytes=200 * MiB,
        pool_memory_budget_bytes=200 * MiB,
        pool_max_per_key=1,
    )
    try:
        a = SandboxRequest(env={"K": "a"}, limits=Limits(0, 100 * MiB, 0, 0, False, 0, 0))
        b = SandboxRequest(env={"K": "b"}, limits=Limits(0, 100 * MiB, 0, 0, False, 0, 0))
        first = manager.create(a)
        manager.destroy(first.id)
        assert eventually(lambda: ready(manager) == 1)
        # Two live sandboxes of b need the whole budget: a's warm container must go.
        manager.create(b)
        manager.create(b)
        assert manager.pool is not None
        assert manager.committed_memory() + manager.pool.warm_memory() <= 200 * MiB
        with pytest.raises(ResourceExhausted):
            manager.admission_timeout = 0.1
            manager.create(b)
    finally:
        manager.stop()


def test_a_failing_launch_stops_the_pool_growing(engine: FakeEngine) -> None:
    manager = start(engine)
    try:
        manager.create(SandboxRequest())
        engine.down = True
        assert manager.pool is not None
        assert eventually(
            lambda: manager.pool is not None and manager.pool.stats()["inflight"] == 0
        )
        engine.down = False
        # Whatever was warmed before the failure may be used; no hot retry loop followed.
        made = len(engine.containers)
        time.sleep(0.2)
        assert len(engine.containers) == made
        with pytest.raises(EngineUnavailable):
            engine.down = True
            manager.create(SandboxRequest(env={"NEW": "1"}))
    finally:
        engine.down = False
        manager.stop()


def test_the_pool_needs_only_the_callables_it_is_given() -> None:
    """No manager: launching, discarding and the free memory are all it asks for."""
    launched: list[SandboxRecord] = []
    discarded: list[SandboxRecord] = []

    def launch(prep: Prepared) -> SandboxRecord:
        record = SandboxRecord(
            id=f"s{len(launched)}",
            container_id=f"c{len(launched)}",
            request=SandboxRequest(),
            limits=prep.limits,
            image_ref=prep.image_ref,
            image_digest="",
            runtime=prep.runtime,
            profile=prep.profile,
            workdir=prep.workdir,
            user=prep.profile.user,
            created_unix=0.0,
            expires_unix=0.0,
        )
        launched.append(record)
        return record

    prep = Prepared(
        BASE, "", Limits(memory_bytes=100 * MiB), DEFAULT_PROFILE, "runc", "/w", (), (), ()
    )
    config = ServerConfig(pool_max_per_key=2, pool_workers=1, pool_idle_seconds=3600.0)
    free = [150 * MiB]
    pool = WarmPool(
        config,
        launch=launch,
        discard=discarded.append,
        free_memory=lambda: free[0],
        memory_budget=1024 * MiB,
    )
    try:
        pool.missed(prep)
        pool.missed(prep)  # the target is two, but the free memory fits one
        assert eventually(lambda: pool.stats()["ready"] == 1)
        assert pool.stats()["target"] == 2 and len(launched) == 1
        taken = pool.take(prep)
        assert taken is launched[0] and not pool.knows(taken.id)
        assert eventually(lambda: pool.stats()["ready"] == 1)  # refilled after the hand-out
    finally:
        pool.stop()
    assert discarded == [launched[1]]
