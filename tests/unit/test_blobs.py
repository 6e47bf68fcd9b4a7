"""The blob store: digest and size checked on arrival, caps, LRU eviction, cleanup."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.blobs import BlobDigest, BlobStore, UploadPart
from sandboxd.errors import InvalidArgument, ResourceExhausted


def digest_of(data: bytes) -> BlobDigest:
    return BlobDigest(hashlib.sha256(data).hexdigest(), len(data))


def parts(*blobs: bytes, chunk: int = 3) -> Iterator[UploadPart]:
    """An upload stream: each blob's digest, then its bytes in `chunk`-byte pieces."""
    for data in blobs:
        yield UploadPart(digest_of(data), b"")
        for start in range(0, len(data), chunk):
            yield UploadPart(None, data[start : start + chunk])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlobStore]:
    blobs = BlobStore(tmp_path / "blobs" / "me", budget=100, max_upload=60)
    blobs.start()
    yield blobs
    blobs.stop()


def test_upload_in_chunks_then_nothing_is_missing_and_content_reads_back(store: BlobStore) -> None:
    a, b = b"alpha" * 4, b"beta" * 3
    assert store.missing([digest_of(a), digest_of(b)]) == [digest_of(a), digest_of(b)]
    assert store.upload(parts(a, b)) == (2, len(a) + len(b))
    assert store.missing([digest_of(a), digest_of(b)]) == []
    assert store.read(digest_of(a).sha256) == a
    assert store.read(digest_of(b).sha256) == b


def test_same_digest_with_another_size_is_missing(store: BlobStore) -> None:
    data = b"content"
    store.upload(parts(data))
    wrong = BlobDigest(digest_of(data).sha256, len(data) + 1)
    assert store.missing([wrong]) == [wrong]


def test_content_not_matching_its_digest_is_refused_and_not_kept(store: BlobStore) -> None:
    lie = BlobDigest(hashlib.sha256(b"promised").hexdigest(), 8)
    with pytest.raises(InvalidArgument, match="not the 8 bytes announced"):
        store.upload(iter([UploadPart(lie, b"deliverd")]))
    assert store.read(lie.sha256) is None
    assert [p.name for p in store.root.iterdir()] == []


def test_more_bytes_than_announced_is_refused(store: BlobStore) -> None:
    d = digest_of(b"abc")
    with pytest.raises(InvalidArgument, match="more than its 3 bytes"):
        store.upload(iter([UploadPart(d, b"abcd")]))
    assert list(store.root.iterdir()) == []


def test_data_before_any_digest_is_refused(store: BlobStore) -> None:
    with pytest.raises(InvalidArgument, match="before the first blob digest"):
        store.upload(iter([UploadPart(None, b"x")]))


def test_bad_digest_is_refused(store: BlobStore) -> None:
    with pytest.raises(InvalidArgument, match="not a hex SHA-256"):
        store.missing([BlobDigest("../etc/passwd", 1)])


def test_a_call_past_the_upload_cap_is_resource_exhausted(store: BlobStore) -> None:
    first, second = os.urandom(40), os.urandom(30)
    with pytest.raises(ResourceExhausted, match="70 bytes in one call is above the limit of 60"):
        store.upload(parts(first, second))
    # The blob that arrived whole before the cap was reached is kept; nothing half-written is.
    assert store.read(digest_of(first).sha256) == first
    assert sorted(p.name for p in store.root.iterdir()) == [digest_of(first).sha256]


def test_a_blob_above_the_budget_is_resource_exhausted(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "b" / "x", budget=10, max_upload=1000)
    store.start()
    try:
        with pytest.raises(ResourceExhausted, match="above the store's budget of 10"):
            store.upload(parts(os.urandom(11)))
    finally:
        store.stop()


def test_least_recently_used_blobs_are_evicted_past_the_budget(store: BlobStore) -> None:
    a, b, c = os.urandom(40), os.urandom(40), os.urandom(40)
    store.upload(parts(a))
    store.upload(parts(b))
    assert store.read(digest_of(a).sha256) == a  # a is now more recent than b
    store.upload(parts(c))  # 120 > 100: the least recently used (b) goes
    assert store.read(digest_of(b).sha256) is None
    assert store.read(digest_of(a).sha256) == a
    assert store.read(digest_of(c).sha256) == c
    assert store.total_bytes == 80
    assert not (store.root / digest_of(b).sha256).exists()


def test_stop_removes_the_store_and_start_reaps_dead_instances(tmp_path: Path) -> None:
    dead = tmp_path / "blobs" / "deadinstance1"
    dead.mkdir(parents=True)
    (dead / "leftover").write_bytes(b"x")
    store = BlobStore(tmp_path / "blobs" / "me")
    (tmp_path / "blobs" / "me").mkdir()
    (tmp_path / "blobs" / "me" / "crashed").write_bytes(b"y")
    store.start()
    assert not dead.exists()
    assert list(store.root.iterdir()) == []
    store.upload(parts(b"data"))
    store.stop()
    assert not store.root.exists()
