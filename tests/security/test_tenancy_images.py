"""Images between tenants: no registry named by a client, no operator image unless public,
no cache hit on a digest alone (issue 11, findings 3, 6 and 7)."""

from __future__ import annotations

import hashlib
import secrets
import socket
import subprocess
from collections.abc import Iterator

import grpc
import pytest
from abuse import PUBLIC_IMAGE, suite_limits

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import SandboxRequest
from sandboxd.blobs import BlobDigest
from sandboxd.client import SandboxClient


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP socket on loopback that records whether anybody connected."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(0.5)
        yield sock


def _connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except TimeoutError:
        return False
    conn.close()
    return True


def test_a_tenant_cannot_make_the_engine_contact_a_registry(
    alice: SandboxClient, listener: socket.socket, base_image: str
) -> None:
    """Finding 3: `base` naming a registry host made the engine call it (GET /v2/)."""
    port = listener.getsockname()[1]
    for base in (f"127.0.0.1:{port}/x:1", f"localhost:{port}/library/x"):
        with pytest.raises(errors.PermissionDenied, match="registry"):
            alice.build_image("RUN true", base=base)
    assert not _connected(listener), "the engine contacted a registry named by a client"
    with pytest.raises(errors.InvalidArgument, match="not an image reference"):
        alice.build_image("RUN true", base="sandbox-base:bookworm\nRUN id")
    # An image the engine has but that is neither allowlisted nor one of ours.
    other = f"sandbox-test/not-a-base:{secrets.token_hex(4)}"
    subprocess.run(["docker", "tag", base_image, other], check=True, timeout=30)
    try:
        with pytest.raises(errors.PermissionDenied, match="base images"):
            alice.build_image("RUN true", base=other)
    finally:
        subprocess.run(["docker", "rmi", other], check=False, timeout=30, capture_output=True)


def test_operator_images_are_private_unless_public(
    operator: SandboxClient, alice: SandboxClient
) -> None:
    """Finding 6: every client saw and could run the operator's own builds."""
    marker = secrets.token_hex(8)
    built = operator.build_image(f"RUN echo {marker} > /operator-secret").image
    try:
        assert built.key not in {i.key for i in alice.list_images()}
        with pytest.raises(errors.PermissionDenied):
            alice.get_image(built.key)
        for ref in (built.key, built.tag, built.digest):
            with pytest.raises(errors.PermissionDenied):
                alice.create_sandbox(SandboxRequest(image=ref, limits=suite_limits()))
        with pytest.raises(errors.PermissionDenied):
            alice.build_image("RUN cat /operator-secret", base=built.tag)
        # Marked public in the config (by its reference), it is everyone's to see and run.
        subprocess.run(["docker", "tag", built.digest, PUBLIC_IMAGE], check=True, timeout=30)
        try:
            assert alice.get_image(built.key).digest == built.digest
            assert built.key in {i.key for i in alice.list_images()}
            sandbox = alice.create_sandbox(
                SandboxRequest(image=PUBLIC_IMAGE, limits=suite_limits())
            )
            alice.destroy_sandbox(sandbox.id)
        finally:
            subprocess.run(
                ["docker", "rmi", PUBLIC_IMAGE], check=False, timeout=30, capture_output=True
            )
    finally:
        operator.delete_image(built.key)


def _digest_only_build(
    client: SandboxClient, fragment: str, path: str, sha: str
) -> pb.BuildImageResult:
    request = pb.BuildImageRequest(
        fragment=fragment, context_files=[pb.ContextFile(path=path, sha256=sha)]
    )
    try:
        for event in client.images.BuildImage(request, metadata=client._metadata, timeout=120):
            if event.HasField("result"):
                return event.result
    except grpc.RpcError as exc:
        raise AssertionError(f"build failed: {exc.details()}") from None
    raise AssertionError("no build result")


def test_a_digest_alone_does_not_get_another_tenants_image(
    alice: SandboxClient, bob: SandboxClient
) -> None:
    """Finding 7: bob sent alice's fragment with her file by digest only and got her image."""
    secret = f"alice's secret {secrets.token_hex(8)}\n".encode()
    sha = hashlib.sha256(secret).hexdigest()
    fragment = "COPY secret.txt /secret.txt"
    built = alice.build_image(fragment, context_files={"secret.txt": secret}).image
    alice.upload_missing({BlobDigest(sha, len(secret)): secret})
    try:
        # The blob store does not confirm to bob that it holds alice's blob ...
        assert bob.find_missing_blobs([BlobDigest(sha, len(secret))]) == [
            BlobDigest(sha, len(secret))
        ]
        # ... and a build naming it by digest is neither a cache hit nor a build from it.
        result = _digest_only_build(bob, fragment, "secret.txt", sha)
        assert result.needs_content and not result.image.key
        with pytest.raises(errors.PermissionDenied):
            bob.get_image(built.key)
        # Alice, who uploaded it, still builds by digest; bob with the content gets a hit.
        assert _digest_only_build(alice, fragment, "secret.txt", sha).image.key == built.key
        again = bob.build_image(fragment, context_files={"secret.txt": secret})
        assert again.cache_hit and again.image.key == built.key
    finally:
        alice.delete_image(built.key)
