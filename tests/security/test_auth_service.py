"""Authentication and ownership through the real service on 127.0.0.1:0 with real sandboxes."""

from __future__ import annotations

import secrets

import grpc
import pytest
from abuse import SecureService, suite_limits

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import SandboxRequest
from sandboxd.archives import tar_of
from sandboxd.client import SandboxClient
from sandboxd.service import OWNER_KEY


def _spec() -> SandboxRequest:
    return SandboxRequest(limits=suite_limits(), ttl_seconds=300)


def test_unauthenticated_tcp_clients_are_refused(secure: SecureService) -> None:
    for token in (None, secrets.token_hex(16)):
        with SandboxClient(secure.tcp, token=token, retry_seconds=1.0) as stranger:
            assert stranger.health() == "SERVING"  # health checks stay open
            with pytest.raises(errors.Unauthenticated):
                stranger.create_sandbox(_spec())
            with pytest.raises(errors.Unauthenticated):
                stranger.list_sandboxes()
            with pytest.raises(errors.Unauthenticated):
                stranger.build_image("RUN true")
    # Without any metadata at all, on the raw channel.
    with grpc.insecure_channel(secure.tcp) as channel:
        call = channel.unary_unary(
            "/sandbox.v1.SandboxService/ListSandboxes",
            request_serializer=pb.ListSandboxesRequest.SerializeToString,
            response_deserializer=pb.ListSandboxesResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(pb.ListSandboxesRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_a_cannot_touch_client_bs_sandbox(
    alice: SandboxClient, bob: SandboxClient, operator: SandboxClient
) -> None:
    mine = alice.create_sandbox(_spec())
    theirs = operator.create_sandbox(_spec())
    try:
        assert alice.exec(mine.id, ["true"]).verdict == "ok"
        for attempt in (
            lambda: bob.exec(mine.id, ["cat", "/etc/hostname"]),
            lambda: bob.get_sandbox(mine.id),
            lambda: bob.put_files(mine.id, "", tar_of({"x": "y"})),
            lambda: bob.get_files(mine.id, "."),
            lambda: bob.destroy_sandbox(mine.id),
            lambda: alice.exec(theirs.id, ["true"]),  # nor the operator's
        ):
            with pytest.raises(errors.PermissionDenied):
                attempt()
        # Claiming alice's name in a header changes nothing: the token decides.
        spoofed = bob.sandboxes.Exec(
            pb.ExecRequest(sandbox_id=mine.id, argv=["true"]),
            metadata=((*bob._metadata, (OWNER_KEY, "alice"))),
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(spoofed)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert mine.id not in {s.id for s in bob.list_sandboxes()}
        assert {s.id for s in alice.list_sandboxes()} == {mine.id}
        assert {mine.id, theirs.id} <= {s.id for s in operator.list_sandboxes()}
    finally:
        alice.destroy_sandbox(mine.id)
        operator.destroy_sandbox(theirs.id)


def test_images_are_per_client(alice: SandboxClient, bob: SandboxClient) -> None:
    fragment = f"LABEL sandbox.test.marker={secrets.token_hex(8)}"
    built = alice.build_image(fragment).image
    try:
        with pytest.raises(errors.PermissionDenied):
            bob.get_image(built.key)
        with pytest.raises(errors.PermissionDenied):
            bob.create_sandbox(SandboxRequest(image=built.key, limits=suite_limits()))
        with pytest.raises(errors.PermissionDenied):
            bob.create_sandbox(SandboxRequest(image=built.tag, limits=suite_limits()))
        with pytest.raises(errors.PermissionDenied):
            bob.build_image("RUN true", base=built.tag)
        with pytest.raises(errors.PermissionDenied):
            bob.delete_image(built.key)
        assert built.key not in {i.key for i in bob.list_images()}
        assert alice.get_image(built.key).digest == built.digest
    finally:
        alice.delete_image(built.key)


def test_per_client_sandbox_limit(alice: SandboxClient, bob: SandboxClient) -> None:
    made = [alice.create_sandbox(_spec()) for _ in range(3)]
    try:
        with pytest.raises(errors.ResourceExhausted, match="its limit is 3"):
            alice.create_sandbox(_spec())
        other = bob.create_sandbox(_spec())  # bob has slots of his own
        bob.destroy_sandbox(other.id)
        alice.destroy_sandbox(made.pop().id)
        made.append(alice.create_sandbox(_spec()))
    finally:
        for sandbox in made:
            alice.destroy_sandbox(sandbox.id)
