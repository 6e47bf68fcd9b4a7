"""Build context as blobs over a real channel: only what the service lacks travels,
in chunks, checked on arrival; the built image holds exactly the bytes sent."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator

import grpc
import pytest

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import BuildResult, SandboxRequest
from sandboxd.blobs import MAX_UPLOAD, BlobDigest
from sandboxd.client import SandboxClient
from sandboxd.limits import Limits

FRAGMENT = "COPY data /data\n"


@pytest.fixture
def build(client: SandboxClient) -> Iterator[Callable[[dict[str, bytes]], tuple[BuildResult, int]]]:
    """Factory: build FRAGMENT over these files; (result, context bytes sent). Every image
    built is deleted afterwards."""
    keys: set[str] = set()

    def run(files: dict[str, bytes]) -> tuple[BuildResult, int]:
        before = client.context_bytes_sent
        result = client.build_image(FRAGMENT, context_files=files, label="blobs-test")
        keys.add(result.image.key)
        return result, client.context_bytes_sent - before

    yield run
    for key in keys:
        client.delete_image(key)


def test_only_missing_blobs_travel_and_the_image_holds_them(
    client: SandboxClient,
    build: Callable[[dict[str, bytes]], tuple[BuildResult, int]],
    limits_factory: Callable[..., Limits],
) -> None:
    # Each file spans several upload chunks (1 MiB each).
    a, b = os.urandom(3 * 1024 * 1024 + 5), os.urandom(2 * 1024 * 1024 + 7)
    first, sent = build({"data/a": a, "data/b": b})
    assert (first.cache_hit, sent) == (False, len(a) + len(b))

    again, sent = build({"data/a": a, "data/b": b})
    assert (again.cache_hit, again.image.key, sent) == (True, first.image.key, 0)

    b2 = os.urandom(len(b))
    changed, sent = build({"data/a": a, "data/b": b2})
    assert (changed.cache_hit, sent) == (False, len(b2))
    assert changed.image.key != first.image.key

    request = SandboxRequest(image=changed.image.key, limits=limits_factory())
    out: list[bytes] = []
    with client.sandbox(request) as box:
        result = box.exec(
            ["sha256sum", "/data/a", "/data/b"], on_output=lambda _stream, data: out.append(data)
        )
    assert result.verdict == "ok", result
    sums = dict(line.split()[::-1] for line in b"".join(out).decode().splitlines())
    assert sums == {
        "/data/a": hashlib.sha256(a).hexdigest(),
        "/data/b": hashlib.sha256(b2).hexdigest(),
    }


def test_find_missing_names_only_what_was_not_uploaded(client: SandboxClient) -> None:
    here, absent = os.urandom(1000), os.urandom(1000)
    d_here = BlobDigest(hashlib.sha256(here).hexdigest(), len(here))
    d_absent = BlobDigest(hashlib.sha256(absent).hexdigest(), len(absent))
    assert client.upload_blobs({d_here: here}) == len(here)
    assert client.find_missing_blobs([d_here, d_absent]) == [d_absent]


def test_a_blob_not_matching_its_digest_is_invalid_argument(client: SandboxClient) -> None:
    d = BlobDigest(hashlib.sha256(b"promised").hexdigest(), 8)
    with pytest.raises(errors.InvalidArgument, match="not the 8 bytes announced"):
        client.upload_blobs({d: b"deliverd"})
    assert client.find_missing_blobs([d]) == [d]


def test_an_upload_past_the_cap_is_resource_exhausted_before_any_data(
    client: SandboxClient,
) -> None:
    huge = pb.BlobDigest(sha256="0" * 64, size_bytes=MAX_UPLOAD + 1)
    with pytest.raises(grpc.RpcError) as info:
        client._blobs.UploadBlobs(iter([pb.UploadBlobsRequest(digest=huge)]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "split the upload" in (info.value.details() or "")
