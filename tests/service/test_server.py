"""Health, reflection and an unreachable engine, over real channels."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.client import SandboxClient
from sandboxd.config import ServerConfig
from sandboxd.server import Service, create_server


def test_health_is_serving_overall_and_per_service(service: Service) -> None:
    with grpc.insecure_channel(service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "sandbox.v1.ImageService", "sandbox.v1.SandboxService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_and_describes_the_services(service: Service) -> None:
    with grpc.insecure_channel(service.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {
            "sandbox.v1.ImageService",
            "sandbox.v1.SandboxService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        pool = DescriptorPool(db)
        sandboxes = pool.FindServiceByName("sandbox.v1.SandboxService")
        assert {m.name for m in sandboxes.methods} >= {
            "CreateSandbox",
            "Exec",
            "PutFiles",
            "GetFiles",
            "Run",
            "DestroySandbox",
        }
        limits = pool.FindMessageTypeByName("sandbox.v1.Limits")
        assert "memory_bytes" in limits.fields_by_name


@pytest.fixture
def unreachable(
    short_tmp: Path, config_factory: Callable[..., ServerConfig]
) -> Iterator[SandboxClient]:
    """A service whose engine socket does not exist, and a client that does not retry."""
    config = config_factory(docker_host="unix:///tmp/nonexistent-sandboxd-test.sock")
    svc, address = create_server(config, f"unix:{short_tmp}/unreachable.sock")
    try:
        with SandboxClient(address, retry_seconds=0.5) as c:
            yield c
    finally:
        svc.stop(grace=1.0)


def test_engine_unreachable_is_unavailable(unreachable: SandboxClient) -> None:
    calls: list[Callable[[], object]] = [
        lambda: unreachable.sandboxes.CreateSandbox(pb.CreateSandboxRequest(), timeout=30),
        lambda: list(
            unreachable.images.BuildImage(pb.BuildImageRequest(fragment="RUN true"), timeout=30)
        ),
        lambda: unreachable.images.ListImages(pb.ListImagesRequest(), timeout=30),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot reach the Docker engine" in info.value.details()
        assert "nonexistent-sandboxd-test.sock" in info.value.details()


def test_engine_unreachable_maps_to_the_clients_engine_unavailable(
    unreachable: SandboxClient,
) -> None:
    from sandboxd.errors import EngineUnavailable

    with pytest.raises(EngineUnavailable, match="is dockerd running"):
        unreachable.create_sandbox(pb.SandboxSpec(), timeout=30)
