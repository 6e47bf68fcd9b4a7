"""The API contract as a client in another language sees it (issue 12, faults 3, 5, 6, 7):
DeleteImage removes the image, reflection in both versions, structured error details,
GetImage by tag. Raw stubs where the point is what goes over the wire."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.limits import Caps, GiB, Limits, MiB
from sandboxd.server import Service, create_server
from sandboxd.wire import request_to_pb

REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def in_engine(ref: str) -> bool:
    """Whether the engine has an image by this id or tag."""
    found = subprocess.run(
        ["docker", "image", "inspect", ref], capture_output=True, timeout=60, check=False
    )
    return found.returncode == 0


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The error a unary call fails with."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def detail_of(err: grpc.RpcError, kind: type) -> object:
    """The one google.rpc detail of this kind the status carries."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no error details with {err.code()}: {err.details()}"
    found = []
    for any_detail in status.details:
        message = kind()
        if any_detail.Unpack(message):
            found.append(message)
    assert len(found) == 1, status.details
    return found[0]


def build(client: SandboxClient) -> pb.Image:
    """A fresh image (a new key every call)."""
    request = pb.BuildImageRequest(fragment=f"RUN echo {uuid.uuid4().hex} > /marker")
    return list(client.images.BuildImage(request, timeout=120))[-1].result.image


@pytest.fixture
def own_service(
    base_image: str, short_tmp: Path, config_factory: Callable[..., object]
) -> Iterator[Callable[..., tuple[Service, SandboxClient]]]:
    """Factory: a service with its own settings and a client of it; both closed after."""
    made: list[tuple[Service, SandboxClient]] = []

    def start(**settings: object) -> tuple[Service, SandboxClient]:
        address = f"unix:{short_tmp}/own-{len(made)}.sock"
        svc, bound = create_server(config_factory(**settings), address)  # type: ignore[arg-type]
        made.append((svc, SandboxClient(bound, retry_seconds=5.0)))
        return made[-1]

    yield start
    for svc, client in made:
        client.close()
        svc.stop(grace=1.0)


@pytest.fixture
def pooled(
    own_service: Callable[..., tuple[Service, SandboxClient]],
) -> Iterator[tuple[Service, SandboxClient]]:
    """A service that keeps one warm container per request, as the default config does."""
    svc, client = own_service(pool_max_per_key=1)
    yield svc, client


@pytest.fixture
def pooled_image(pooled: tuple[Service, SandboxClient]) -> Iterator[pb.Image]:
    """An image built on the pooled service; removed from the engine after, whatever happened."""
    image = build(pooled[1])
    yield image
    subprocess.run(["docker", "rmi", "-f", image.digest], capture_output=True, check=False)


def small(limits_factory: Callable[..., Limits]) -> Limits:
    return limits_factory(memory_bytes=64 * MiB)


def test_delete_image_removes_an_image_that_warm_containers_ran(
    pooled: tuple[Service, SandboxClient],
    pooled_image: pb.Image,
    limits_factory: Callable[..., Limits],
) -> None:
    svc, client = pooled
    pool = svc.core.manager.pool
    assert pool is not None
    request = SandboxRequest(image=pooled_image.key, limits=small(limits_factory))
    box = client.create_sandbox(request)
    client.destroy_sandbox(box.id)
    deadline = time.monotonic() + 60
    while pool.stats()["ready"] < 1:
        assert time.monotonic() < deadline, "no warm container came"
        time.sleep(0.1)

    client.images.DeleteImage(pb.DeleteImageRequest(key=pooled_image.key), timeout=120)

    assert not in_engine(pooled_image.digest), "the image is still in the engine"
    listed = client.images.ListImages(pb.ListImagesRequest(), timeout=30).images
    assert pooled_image.key not in {i.key for i in listed}
    assert not [i for i in listed if "<none>" in i.tag or not i.tag]
    again = rpc_error(
        lambda: client.images.DeleteImage(pb.DeleteImageRequest(key=pooled_image.key))
    )
    assert again.code() == grpc.StatusCode.NOT_FOUND


def test_delete_image_refuses_while_a_sandbox_runs_on_it(
    pooled: tuple[Service, SandboxClient],
    pooled_image: pb.Image,
    limits_factory: Callable[..., Limits],
) -> None:
    _, client = pooled
    request = SandboxRequest(image=pooled_image.key, limits=small(limits_factory))
    box = client.create_sandbox(request)
    try:
        err = rpc_error(
            lambda: client.images.DeleteImage(pb.DeleteImageRequest(key=pooled_image.key))
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert box.id in err.details() and "destroy it first" in err.details()
        assert in_engine(pooled_image.tag), "it was untagged"
    finally:
        client.destroy_sandbox(box.id)
    client.images.DeleteImage(pb.DeleteImageRequest(key=pooled_image.tag), timeout=120)
    assert not in_engine(pooled_image.digest)


def test_get_image_takes_a_tag_as_well_as_a_key(client: SandboxClient) -> None:
    image = build(client)
    try:
        size = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Size}}", image.digest],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        assert image.size_bytes == int(size) > 0  # BuildImage says what the engine says
        by_tag = client.images.GetImage(pb.GetImageRequest(key=image.tag), timeout=30)
        assert (by_tag.key, by_tag.digest, by_tag.size_bytes) == (
            image.key,
            image.digest,
            image.size_bytes,
        )
        by_key = client.images.GetImage(pb.GetImageRequest(key=image.key), timeout=30)
        assert by_key.tag == image.tag
        base = rpc_error(
            lambda: client.images.GetImage(pb.GetImageRequest(key="sandbox-base:bookworm"))
        )
        assert base.code() == grpc.StatusCode.NOT_FOUND
        assert "no image built by sandboxd has the tag" in base.details()
    finally:
        client.delete_image(image.key)


def reflect(
    channel: grpc.Channel, version: str, **ask: str
) -> reflection_pb2.ServerReflectionResponse:
    """One reflection request in `version` ("v1" or "v1alpha"); both share the message bytes."""
    request = reflection_pb2.ServerReflectionRequest(**ask)
    if version == "v1alpha":
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        return next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    call = channel.stream_stream(
        REFLECTION_V1,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(iter(call(iter([request]), timeout=10)))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_is_served_in_v1_and_v1alpha(service: Service, version: str) -> None:
    with grpc.insecure_channel(service.address) as channel:
        listed = reflect(channel, version, list_services="")
        names = {s.name for s in listed.list_services_response.service}
        assert {
            "sandbox.v1.SandboxService",
            "sandbox.v1.ImageService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        for symbol in ("sandbox.v1.SandboxService", f"grpc.reflection.{version}.ServerReflection"):
            found = reflect(channel, version, file_containing_symbol=symbol)
            assert not found.HasField("error_response"), found.error_response
            files = [
                descriptor_pb2.FileDescriptorProto.FromString(raw)
                for raw in found.file_descriptor_response.file_descriptor_proto
            ]
            services = {f"{f.package}.{s.name}" for f in files for s in f.service}
            assert symbol in services


def test_invalid_argument_names_the_field_in_a_bad_request_detail(client: SandboxClient) -> None:
    spec = request_to_pb(SandboxRequest())
    spec.limits.memory_bytes = 1024 * GiB
    err = rpc_error(
        lambda: client.sandboxes.CreateSandbox(pb.CreateSandboxRequest(spec=spec), timeout=30)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = detail_of(err, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["limits.memory_bytes"]  # type: ignore[attr-defined]
    assert "cap" in bad.field_violations[0].description  # type: ignore[attr-defined]

    with pytest.raises(errors.InvalidArgument) as raised:
        client.create_sandbox(SandboxRequest(limits=Limits(memory_bytes=1024 * GiB)))
    assert raised.value.field == "limits.memory_bytes"
    assert [v.field for v in raised.value.violations] == ["limits.memory_bytes"]


def test_resource_exhausted_carries_retry_info(
    own_service: Callable[..., tuple[Service, SandboxClient]],
    limits_factory: Callable[..., Limits],
) -> None:
    _, client = own_service(caps=Caps(sandboxes=1), admission_timeout_seconds=0.2)
    box = client.create_sandbox(SandboxRequest(limits=small(limits_factory)))
    try:
        spec = request_to_pb(SandboxRequest(limits=small(limits_factory)))
        err = rpc_error(
            lambda: client.sandboxes.CreateSandbox(pb.CreateSandboxRequest(spec=spec), timeout=30)
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = detail_of(err, error_details_pb2.RetryInfo)
        delay = retry.retry_delay.ToTimedelta().total_seconds()  # type: ignore[attr-defined]
        assert delay > 0
        trailers = {m.key: m.value for m in err.trailing_metadata()}  # type: ignore[attr-defined]
        assert float(trailers["retry-after"]) == delay, "the older trailer is still sent"

        with pytest.raises(errors.ResourceExhausted) as raised:
            client.create_sandbox(SandboxRequest(limits=small(limits_factory)))
        assert raised.value.retry_after == delay
    finally:
        client.destroy_sandbox(box.id)


@pytest.mark.parametrize(
    ("field", "value"),
    [("memory_bytes", 8 * GiB + 1), ("pids", 10_000_000), ("output_bytes", 10**14)],
)
def test_a_value_above_its_cap_is_quoted_as_sent(
    client: SandboxClient, field: str, value: int
) -> None:
    spec = request_to_pb(SandboxRequest())
    setattr(spec.limits, field, value)
    err = rpc_error(
        lambda: client.sandboxes.CreateSandbox(pb.CreateSandboxRequest(spec=spec), timeout=30)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A client compares the message with what it sent: 1e+14 or 8.58993e+09 is neither.
    assert f"limits.{field}: {value} " in (err.details() or "")


def test_a_create_waits_for_room_up_to_its_own_deadline(
    own_service: Callable[..., tuple[Service, SandboxClient]],
    limits_factory: Callable[..., Limits],
) -> None:
    # The admission timeout is far off: the call's 2 s deadline bounds the wait, and the
    # client still hears RESOURCE_EXHAUSTED with a retry hint, not DEADLINE_EXCEEDED.
    _, client = own_service(caps=Caps(sandboxes=1), admission_timeout_seconds=120.0)
    box = client.create_sandbox(SandboxRequest(limits=small(limits_factory)))
    try:
        with pytest.raises(errors.ResourceExhausted, match="sandbox slots") as raised:
            client.create_sandbox(SandboxRequest(limits=small(limits_factory)), timeout=2.0)
        assert raised.value.retry_after
    finally:
        client.destroy_sandbox(box.id)
