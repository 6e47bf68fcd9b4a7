"""The one rule for leftovers (`reaping.LeftoverRule`), as the reaper and `sandboxd gc` use it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from fake_engine import BASE, FakeEngine

from sandboxd import instances, reaping
from sandboxd.config import ServerConfig
from sandboxd.engine.base import (
    LABEL_EXPIRES,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_SANDBOX,
    ContainerInfo,
)
from sandboxd.images import ImageStore
from sandboxd.sandboxes import SandboxManager, SandboxRequest

NOW = 1_000_000.0
Rule = reaping.LeftoverRule


def new_id() -> str:
    return "unit" + uuid.uuid4().hex[:8]


def info(
    owner: str,
    *,
    expires: float | None = None,
    name: str = "sandbox-s1",
    sandbox: str = "s1",
    created: float = NOW - 3600,
) -> ContainerInfo:
    labels = {LABEL_MANAGED: "1", LABEL_INSTANCE: owner, LABEL_SANDBOX: sandbox}
    if expires is not None:
        labels[LABEL_EXPIRES] = f"{expires:.0f}"
    return ContainerInfo(f"c-{owner}", name, labels, "running", created)


@pytest.fixture
def live() -> Iterator[str]:
    """The id of another instance that is alive while the test runs."""
    lock = instances.InstanceLock(new_id())
    lock.acquire()
    try:
        yield lock.instance_id
    finally:
        lock.release()


def test_a_dead_instances_container_is_a_leftover_whatever_its_expiry() -> None:
    assert Rule().takes(info(new_id(), expires=NOW + 3600), NOW)
    assert Rule().takes(info(new_id()), NOW)
    assert Rule().takes(info(""), NOW)  # no owner: nobody answers for it


def test_a_live_instances_container_goes_only_past_its_expiry_or_when_foreign(live: str) -> None:
    assert not Rule().takes(info(live, expires=NOW + 1), NOW)
    assert not Rule().takes(info(live), NOW)  # no expiry stated: its owner decides
    assert Rule().takes(info(live, expires=NOW), NOW)
    assert Rule(sweep="foreign").takes(info(live, expires=NOW + 1), NOW)
    assert Rule(sweep="all").takes(info(live, expires=NOW + 1), NOW)


def test_our_own_container_goes_only_when_forgotten_and_old_enough() -> None:
    me = new_id()
    old = NOW - reaping.FORGOTTEN_AFTER_SECONDS
    young = NOW - reaping.FORGOTTEN_AFTER_SECONDS + 1
    assert Rule(ours=me).takes(info(me, created=old), NOW)
    assert not Rule(ours=me).takes(info(me, created=young), NOW)
    assert not Rule(ours=me, known=lambda s: True).takes(info(me, created=old), NOW)
    # Our own are ours even for a foreign sweep, and past the label's expiry: the TTL in
    # memory decides those (reap_expired).
    mine = info(me, expires=NOW - 1, created=young)
    assert not Rule(ours=me, sweep="foreign").takes(mine, NOW)


def test_kept_name_round_trips_and_replaces_an_earlier_mark() -> None:
    name = reaping.kept_name("sandbox-abc", NOW + 60.4)
    assert name == f"sandbox-abc.kept-until-{NOW + 60:.0f}"
    assert reaping.kept_until(name) == NOW + 60
    assert reaping.kept_until(reaping.kept_name(name, NOW + 5)) == NOW + 5
    assert reaping.kept_until("sandbox-abc") is None
    assert reaping.kept_until("sandbox-abc.kept-until-soon") is None


def test_a_kept_container_is_spared_by_every_sweep_until_its_time(live: str) -> None:
    kept = reaping.kept_name("sandbox-s1", NOW + 60)
    dead_owner = info(new_id(), name=kept)
    live_owner = info(live, name=kept, expires=NOW - 1)
    sweeps: tuple[reaping.Sweep, ...] = ("orphans", "foreign")
    for candidate in (dead_owner, live_owner):
        for sweep in sweeps:
            assert not Rule(sweep=sweep).takes(candidate, NOW)
            assert Rule(sweep=sweep).takes(candidate, NOW + 60)
        assert Rule(sweep="all").takes(candidate, NOW)  # gc --all: a person asked
    # Unreadable time after the mark: not kept, so the usual rule applies (owner dead).
    assert Rule().takes(info(new_id(), name="sandbox-s1.kept-until-x"), NOW)


def test_leftovers_lists_only_labelled_containers_the_rule_takes(
    engine: FakeEngine, live: str
) -> None:
    dead = engine.add_container(info(new_id()).labels)
    engine.add_container(info(live, expires=time.time() + 3600).labels)
    engine.add_container({LABEL_MANAGED: "1"})  # inherited from an image: not a sandbox
    assert [i.id for i in Rule().find(engine, time.time())] == [dead]


def make_manager(engine: FakeEngine) -> SandboxManager:
    config = ServerConfig(instance_id=new_id(), reap_interval_seconds=3600.0, pool_max_per_key=0)
    return SandboxManager(config, engine, ImageStore(engine, BASE))


def test_a_sandbox_kept_at_stop_outlives_other_reapers_until_its_ttl(engine: FakeEngine) -> None:
    first = make_manager(engine)
    first.start()
    kept = first.create(SandboxRequest(ttl_seconds=600))
    gone = first.create(SandboxRequest(ttl_seconds=600))
    first.stop(keep=[kept.id])
    assert list(engine.containers) == [kept.container_id]
    name = engine.containers[kept.container_id].spec.name
    assert reaping.kept_until(name) == pytest.approx(kept.expires_unix, abs=1)
    assert gone.container_id in engine.removed

    later = make_manager(engine)  # a sandboxd started after the first one ended
    later.start()
    try:
        assert kept.container_id in engine.containers
        assert later.reaper.reap_orphans(foreign=True) == 0
        # Its time has come (as if the clock had moved on):
        engine.rename_container(kept.container_id, reaping.kept_name(name, time.time() - 1))
        assert later.reap_orphans() == 1
        assert kept.container_id not in engine.containers
    finally:
        later.stop()


def test_gc_removes_what_the_rule_takes_and_kept_ones_only_with_all(
    engine: FakeEngine,
    live: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sandboxd import cli

    monkeypatch.setattr("sandboxd.engine.make_engine", lambda config: engine)
    dead = engine.add_container(info(new_id()).labels)
    theirs = engine.add_container(info(live, expires=time.time() + 3600).labels)
    kept = engine.add_container(info(new_id()).labels)
    engine.rename_container(kept, reaping.kept_name("sandbox-k", time.time() + 600))
    assert cli.main(["gc"]) == 0
    assert "removed 1 containers" in capsys.readouterr().out
    assert set(engine.containers) == {theirs, kept}
    assert dead in engine.removed
    assert cli.main(["gc", "--all"]) == 0
    assert engine.containers == {}
