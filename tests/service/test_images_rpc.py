"""ImageService over a real channel against the real engine."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest

from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.client import SandboxClient


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return info.value


@pytest.fixture
def built(client: SandboxClient) -> Iterator[Callable[[str], list[pb.BuildImageEvent]]]:
    """Factory: stream a build of a fragment; every image built is deleted afterwards."""
    keys: set[str] = set()

    def build(fragment: str, **kw: object) -> list[pb.BuildImageEvent]:
        request = pb.BuildImageRequest(fragment=fragment, **kw)  # type: ignore[arg-type]
        events = list(client.images.BuildImage(request, timeout=120))
        keys.add(events[-1].result.image.key)
        return events

    yield build
    for key in keys:
        client.delete_image(key)


def test_build_streams_log_then_result_and_second_build_is_a_cache_hit(
    client: SandboxClient, built: Callable[..., list[pb.BuildImageEvent]]
) -> None:
    marker = uuid.uuid4().hex
    fragment = f"RUN echo {marker} > /marker.txt\nCOPY hello.txt /hello.txt"
    files = [pb.ContextFile(path="hello.txt", content=b"hi there\n")]
    first = built(fragment, context_files=files, label="svc-test")
    assert all(e.HasField("log_line") for e in first[:-1])
    assert any(marker in e.log_line for e in first[:-1])
    result = first[-1].result
    assert not result.cache_hit
    assert len(result.image.key) == 64
    assert result.image.digest.startswith("sha256:")
    assert result.image.tag == f"sandbox/img:{result.image.key[:32]}"
    assert result.image.label == "svc-test"

    second = built(fragment + "\n\n", context_files=files)
    assert len(second) == 1, "a cache hit streams no build log"
    assert second[0].result.cache_hit
    assert second[0].result.image.digest == result.image.digest
    assert second[0].result.build_seconds < 1.0

    assert client.get_image(result.image.key).digest == result.image.digest
    assert result.image.key in {i.key for i in client.list_images()}
    # The size is the engine's, the same in every answer (it was 0 from BuildImage and
    # GetImage); the image holds at least the base's Python.
    listed = {i.key: i.size_bytes for i in client.list_images()}[result.image.key]
    sizes = {result.image.size_bytes, second[0].result.image.size_bytes, listed}
    assert sizes == {client.get_image(result.image.key).size_bytes}, sizes
    assert listed > 10 * 1024 * 1024


def test_delete_image_removes_it(client: SandboxClient) -> None:
    fragment = f"RUN echo {uuid.uuid4().hex} > /m"
    result = client.build_image(fragment)
    client.delete_image(result.image.key)
    err = rpc_error(lambda: client.images.GetImage(pb.GetImageRequest(key=result.image.key)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert result.image.key not in {i.key for i in client.list_images()}


def test_fragment_syntax_error_is_invalid_argument_naming_the_line(
    client: SandboxClient,
) -> None:
    request = pb.BuildImageRequest(fragment="RUN true\nNOTACOMMAND foo")
    err = rpc_error(lambda: client.images.BuildImage(request, timeout=60))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # refused before any step runs
    assert "fragment line 2: unknown instruction NOTACOMMAND" in err.details()
    assert "NOTACOMMAND foo" in err.details()


def test_failing_step_is_failed_precondition_with_the_log_tail(client: SandboxClient) -> None:
    marker = uuid.uuid4().hex
    request = pb.BuildImageRequest(fragment=f"RUN echo {marker} && exit 3")
    err = rpc_error(lambda: client.images.BuildImage(request, timeout=60))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "returned a non-zero code: 3" in err.details()
    tail = err.details().split("build log tail", 1)[1]
    assert marker in tail, "the step's own output is in the message"


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (pb.BuildImageRequest(fragment="FROM debian\nRUN true"), "FROM is not allowed"),
        (
            pb.BuildImageRequest(context_files=[pb.ContextFile(path="../x", content=b"")]),
            "context_files.path",
        ),
        (pb.BuildImageRequest(fragment="RUN true\x00"), "NUL byte"),
    ],
)
def test_bad_build_input_is_invalid_argument(
    client: SandboxClient, request_: pb.BuildImageRequest, why: str
) -> None:
    err = rpc_error(lambda: client.images.BuildImage(request_, timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in err.details()


def test_get_image_bad_and_unknown_keys(client: SandboxClient) -> None:
    err = rpc_error(lambda: client.images.GetImage(pb.GetImageRequest(key="")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "neither an image key (64 hex digits) nor a tag" in err.details()
    # Anything else may be a tag (GetImage takes tags too): unknown, not malformed.
    err = rpc_error(lambda: client.images.GetImage(pb.GetImageRequest(key="nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(lambda: client.images.GetImage(pb.GetImageRequest(key="0" * 64)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(lambda: client.images.DeleteImage(pb.DeleteImageRequest(key="0" * 64)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
