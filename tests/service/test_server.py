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
from sandboxd.api import SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.config import ServerConfig
from sandboxd.limits import Caps, Limits
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
        unreachable.create_sandbox(SandboxRequest(), timeout=30)


def test_server_info_reports_the_engine_the_runtimes_and_the_api(client: SandboxClient) -> None:
    info = client.server_info()
    assert info.api_version == "sandbox.v1"
    assert info.engine == "docker"
    assert info.engine_version, "the engine's version is reported"
    assert "runc" in info.runtimes
    assert {p.name for p in info.profiles} >= {"default", "untrusted"}
    untrusted = next(p for p in info.profiles if p.name == "untrusted")
    assert (untrusted.runtime, untrusted.allow_network) == ("runsc", False)
    assert info.default_profile == "default"


def test_server_info_carries_the_operators_caps_and_defaults(
    short_tmp: Path, config_factory: Callable[..., ServerConfig]
) -> None:
    caps = Caps(timeout_seconds=120.0, ttl_seconds=600.0, sandboxes=3, memory_bytes=1 << 30)
    defaults = Limits(memory_bytes=64 << 20, pids=50, timeout_seconds=7.0)
    config = config_factory(caps=caps, defaults=defaults, default_ttl_seconds=300.0)
    svc, address = create_server(config, f"unix:{short_tmp}/info.sock")
    try:
        with SandboxClient(address, retry_seconds=5.0) as c:
            c.wait_ready(timeout=10.0)
            info = c.server_info()
            health = health_pb2_grpc.HealthStub(c._channel)
            status = health.Check(
                health_pb2.HealthCheckRequest(service="sandbox.v1.InfoService"), timeout=5
            ).status
    finally:
        svc.stop(grace=1.0)
    assert info.caps == caps
    assert info.defaults == defaults
    assert info.default_ttl_seconds == 300.0
    assert info.base_image == config.base_image
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_server_info_from_an_unreachable_engine_is_unavailable(
    unreachable: SandboxClient,
) -> None:
    from sandboxd.errors import EngineUnavailable

    with pytest.raises(EngineUnavailable, match=r"nonexistent-sandboxd-test\.sock"):
        unreachable.server_info()
