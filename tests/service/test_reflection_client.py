"""The README's grpcurl requests, made the way grpcurl makes them: the schema from server
reflection alone (no .proto file, none of the generated stubs), requests parsed from the
same JSON, answers printed as JSON with the proto field names."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from sandboxd.server import Service

FRAGMENT = "RUN echo built by grpcurl > /etc/greeting"
RUN = """{
    "build": {"fragment": "RUN echo built by grpcurl > /etc/greeting"},
    "spec": {"limits": {"memory_bytes": "67108864", "timeout_seconds": 10}},
    "argv": ["sh", "-c", "cat /etc/greeting; echo $((6 * 7))"]
}"""


class ReflectionClient:
    """Calls any method by its full name with a JSON request, like `grpcurl -d JSON`."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))

    def call(self, name: str, request: str = "{}") -> list[dict[str, Any]]:
        service_name, method_name = name.split("/")
        method = self.pool.FindServiceByName(service_name).methods_by_name[method_name]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        kind = "unary_stream" if method.server_streaming else "unary_unary"
        rpc = getattr(self.channel, kind)(
            f"/{name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        answer = rpc(json_format.Parse(request, request_class()), timeout=300)
        answers = answer if method.server_streaming else [answer]
        return [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in answers]


@pytest.fixture(scope="module")
def reflection(service: Service) -> Iterator[ReflectionClient]:
    channel = grpc.insecure_channel(service.address)
    try:
        yield ReflectionClient(channel)
    finally:
        channel.close()


def test_health_info_and_images(reflection: ReflectionClient) -> None:
    assert reflection.call("grpc.health.v1.Health/Check") == [{"status": "SERVING"}]
    (info,) = reflection.call("sandbox.v1.InfoService/GetServerInfo")
    assert info["api_version"] == "sandbox.v1"
    assert int(info["caps"]["memory_bytes"]) > 0  # 64-bit integers are strings in JSON
    (listing,) = reflection.call("sandbox.v1.ImageService/ListImages")
    assert all(image["tag"].startswith("sandbox/img:") for image in listing.get("images", []))


def test_a_build_then_a_run(reflection: ReflectionClient) -> None:
    events = reflection.call(
        "sandbox.v1.ImageService/BuildImage", json.dumps({"fragment": FRAGMENT})
    )
    image = events[-1]["result"]["image"]
    assert image["tag"].startswith("sandbox/img:")
    events = reflection.call("sandbox.v1.SandboxService/Run", RUN)
    output = b"".join(base64.b64decode(e["output"]["data"]) for e in events if "output" in e)
    assert output == b"built by grpcurl\n42\n"
    result = events[-1]["result"]
    assert result["exec"]["verdict"] == "VERDICT_OK"
    assert result["cache_hit"] is True  # the build above made it
    assert result["sandbox"]["limits"]["memory_bytes"] == "67108864"
