"""Ownership in the core: a client reaches only its own images and sandboxes, within its cap."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fake_engine import BASE, FakeBuilder, FakeEngine

from sandboxd.api import ImageRecord
from sandboxd.config import ServerConfig
from sandboxd.errors import PermissionDenied, ResourceExhausted
from sandboxd.images import BuildOutcome, ImageStore
from sandboxd.sandboxes import SandboxManager, SandboxRequest


def build(
    store: ImageStore, owner: str, fragment: str = "RUN true", base: str = ""
) -> BuildOutcome:
    items = list(store.build(base, fragment, [], owner=owner))
    outcome = items[-1]
    assert isinstance(outcome, BuildOutcome)
    return outcome


def test_another_clients_image_is_refused_by_key_tag_and_as_a_base(store: ImageStore) -> None:
    image: ImageRecord = build(store, "alice").image
    assert store.get(image.key, "alice") == image
    with pytest.raises(PermissionDenied):
        store.get(image.key, "bob")
    with pytest.raises(PermissionDenied):
        store.resolve_ref(image.key, "bob")
    with pytest.raises(PermissionDenied):
        store.resolve_ref(image.tag, "bob")
    with pytest.raises(PermissionDenied):
        store.resolve_ref(image.digest, "bob")
    with pytest.raises(PermissionDenied):
        build(store, "bob", "RUN cat /secret", base=image.tag)
    assert [r.key for r in store.list("bob")] == []
    assert [r.key for r in store.list("alice")] == [image.key]
    # The operator reaches everything; the unowned base image is everyone's.
    assert store.get(image.key, "") == image
    assert store.resolve_ref("", "bob")[0] == BASE


def test_building_the_same_content_grants_use_but_not_deletion(store: ImageStore) -> None:
    image = build(store, "alice").image
    again = build(store, "bob")
    assert again.cache_hit and again.image.key == image.key
    assert store.resolve_ref(image.key, "bob") == (image.tag, image.digest)
    with pytest.raises(PermissionDenied):
        store.delete(image.key, "bob")
    store.delete(image.key, "alice")


@pytest.fixture
def manager(engine: FakeEngine) -> Iterator[SandboxManager]:
    config = ServerConfig(
        instance_id="unit" + uuid.uuid4().hex[:8],
        reap_interval_seconds=3600.0,
        max_sandboxes_per_client=2,
    )
    m = SandboxManager(config, engine, ImageStore(engine, BASE, builder=FakeBuilder(engine)))
    m.start()
    try:
        yield m
    finally:
        m.stop()


def test_clients_never_reach_the_operators_sandboxes(manager: SandboxManager) -> None:
    mine = manager.create(SandboxRequest())
    assert manager.list("alice") == []
    with pytest.raises(PermissionDenied):
        manager.get(mine.id, "alice")
    with pytest.raises(PermissionDenied):
        manager.destroy(mine.id, "alice")
    assert manager.get(mine.id, "").id == mine.id


def test_sandboxes_from_another_clients_image_are_refused(manager: SandboxManager) -> None:
    image = build(manager.images, "alice").image
    with pytest.raises(PermissionDenied):
        manager.create(SandboxRequest(image=image.key, owner="bob"))
    with pytest.raises(PermissionDenied):
        manager.create(SandboxRequest(image=image.tag, owner="bob"))
    assert manager.create(SandboxRequest(image=image.key, owner="alice")).owner == "alice"


def test_per_client_cap_refuses_at_once_and_spares_other_clients(
    manager: SandboxManager,
) -> None:
    a1 = manager.create(SandboxRequest(owner="alice"))
    manager.create(SandboxRequest(owner="alice"))
    with pytest.raises(
        ResourceExhausted, match=r"client 'alice' holds 2 sandboxes, its limit is 2"
    ):
        manager.create(SandboxRequest(owner="alice"))
    manager.create(SandboxRequest(owner="bob"))
    manager.create(SandboxRequest())  # the operator has no per-client cap
    manager.destroy(a1.id, "alice")
    manager.create(SandboxRequest(owner="alice"))
