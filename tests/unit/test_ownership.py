"""Ownership rules on their own: references, the base allowlist, public images, blobs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fake_engine import BASE, FakeEngine

from sandboxd.api import ContextFile, ImageRecord
from sandboxd.blobs import BlobDigest, BlobStore, UploadPart
from sandboxd.engine.base import LABEL_KEY
from sandboxd.errors import InvalidArgument, PermissionDenied
from sandboxd.images import BuildOutcome, ImageStore, NeedsContent
from sandboxd.ownership import ImagePolicy, check_reference, registry_host


@pytest.mark.parametrize(
    ("ref", "host"),
    [
        ("sandbox-base:bookworm", ""),
        ("sandbox/img:abc", ""),
        ("python:3.12-slim", ""),
        ("127.0.0.1:5000/x:1", "127.0.0.1:5000"),
        ("localhost/x", "localhost"),
        ("registry.example/team/x@sha256:" + "a" * 64, "registry.example"),
    ],
)
def test_registry_host_reads_references_as_docker_does(ref: str, host: str) -> None:
    assert check_reference(ref, "base") == ref
    assert registry_host(ref) == host


@pytest.mark.parametrize(
    "ref", ["", "base\nRUN id", "Upper/Case", "a b", "x:" + "t" * 200, "x@sha256:short"]
)
def test_a_reference_is_one_reference_and_nothing_more(ref: str) -> None:
    with pytest.raises(InvalidArgument, match="not an image reference"):
        check_reference(ref, "base")


def test_tenants_build_only_on_allowlisted_bases_or_our_images(engine: FakeEngine) -> None:
    engine.add_image("debian:bookworm")
    engine.add_image("python:3.12-slim")
    store = ImageStore(engine, BASE, policy=ImagePolicy(bases=(BASE, "python:3.12-slim")))
    for base in ("", BASE, "python:3.12-slim"):
        assert store.resolve_base(base, "alice")[0] == (base or BASE)
    with pytest.raises(PermissionDenied, match="registry"):
        store.resolve_base("127.0.0.1:5000/x:1", "alice")
    with pytest.raises(PermissionDenied, match="base images"):
        store.resolve_base("debian:bookworm", "alice")
    assert store.resolve_base("debian:bookworm", "")[0] == "debian:bookworm"  # the operator


def test_operator_images_are_private_unless_public(engine: FakeEngine) -> None:
    digest = engine.add_image("ops/tool:1", {LABEL_KEY: "k" * 64})
    theirs = ImageRecord(key="k" * 64, digest=digest, tag="ops/tool:1", base="")
    base = ImageRecord(key="", digest=engine.image_id(BASE) or "", tag=BASE, base="")
    private = ImageStore(engine, BASE)
    assert not private.may_use(theirs, "alice") and private.may_use(theirs, "")
    assert private.may_use(base, "alice")
    public = ImageStore(engine, BASE, policy=ImagePolicy(bases=(BASE,), public=("ops/tool:1",)))
    assert public.may_use(theirs, "alice")
    # By digest too: the public reference names the same image as another tag.
    assert public.may_use(ImageRecord(key="", digest=digest, tag="other:1", base=""), "bob")
    mine = ImageRecord(key="m" * 64, digest="sha256:x", tag="t", base="", owner="alice")
    assert private.may_use(mine, "alice") and not private.may_use(mine, "bob")


def _blob_store(tmp_path: Path) -> BlobStore:
    blobs = BlobStore(tmp_path / "blobs" / "me", budget=1000, max_upload=1000)
    blobs.start()
    return blobs


def test_a_blob_is_present_only_for_the_tenant_that_uploaded_it(tmp_path: Path) -> None:
    blobs = _blob_store(tmp_path)
    try:
        data = b"alice's file"
        digest = BlobDigest(hashlib.sha256(data).hexdigest(), len(data))
        blobs.upload(iter([UploadPart(digest, data)]), owner="alice")
        assert blobs.missing([digest], "alice") == []
        assert blobs.missing([digest], "bob") == [digest]
        assert blobs.missing([digest], "") == []  # the operator
        assert blobs.read(digest.sha256, "bob") is None
        assert blobs.read(digest.sha256, "alice") == data
        blobs.upload(iter([UploadPart(digest, data)]), owner="bob")  # bob proves it
        assert blobs.read(digest.sha256, "bob") == data
    finally:
        blobs.stop()


def test_a_digest_alone_is_no_cache_hit_for_another_tenant(
    engine: FakeEngine, tmp_path: Path
) -> None:
    blobs = _blob_store(tmp_path)
    try:
        store = ImageStore(engine, BASE, blobs=blobs)
        data = b"secret"
        sha = hashlib.sha256(data).hexdigest()
        built = list(store.build("", "COPY f /f", [ContextFile("f", data)], owner="alice"))[-1]
        assert isinstance(built, BuildOutcome)
        by_digest = [ContextFile("f", b"", sha256=sha)]
        assert isinstance(
            list(store.build("", "COPY f /f", by_digest, owner="bob"))[-1], NeedsContent
        )
        assert not store.may_use(built.image, "bob")
        blobs.upload(iter([UploadPart(BlobDigest(sha, len(data)), data)]), owner="alice")
        again = list(store.build("", "COPY f /f", by_digest, owner="alice"))[-1]
        assert isinstance(again, BuildOutcome) and again.cache_hit
    finally:
        blobs.stop()
