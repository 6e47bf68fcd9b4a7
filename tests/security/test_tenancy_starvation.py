"""One tenant cannot stall the service for everyone (issue 11, finding 10)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from abuse import SecureService
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.client import SandboxClient
from sandboxd.server import Service

STALLED = 70


def _never_sends(release: threading.Event) -> Iterator[pb.PutFilesRequest]:
    release.wait()
    return
    yield  # a generator that sends nothing until released


def test_stalled_streams_do_not_starve_other_clients(
    secure: SecureService, alice: SandboxClient, bob: SandboxClient
) -> None:
    """70 PutFiles streams that never send their first message took every worker thread:
    Health.Check and other clients' calls then timed out."""
    release = threading.Event()
    calls = [
        alice.sandboxes.PutFiles.future(
            _never_sends(release), metadata=alice._metadata, timeout=120
        )
        for _ in range(STALLED)
    ]
    try:
        with grpc.insecure_channel(secure.tcp) as channel:
            probe = health_pb2_grpc.HealthStub(channel)
            answer = probe.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert isinstance(bob.list_images(), list)  # within the client's own deadline
        # Each stalled stream ends: refused at alice's cap (with a retry hint), or cancelled
        # once it has sent no first message within the server's deadline.
        codes: dict[grpc.StatusCode, int] = {}
        hinted = 0
        for call in calls:
            try:
                call.result(timeout=60)
            except grpc.RpcError as exc:
                codes[exc.code()] = codes.get(exc.code(), 0) + 1
                trailers = dict(exc.trailing_metadata() or ())
                hinted += "retry-after" in trailers
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
        assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) >= STALLED - 16
        assert hinted == codes[grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert codes.get(grpc.StatusCode.CANCELLED, 0) >= 1
    finally:
        release.set()
        for call in calls:
            call.cancel()
    # Her slots are free again.
    assert isinstance(alice.list_sandboxes(), list)


def test_cheap_reads_have_threads_of_their_own(
    base_image: str, short_tmp: Path, config_factory: Callable[..., object]
) -> None:
    """With every worker thread held by stalled streams (the operator has no cap), health
    checks and listings still answer: they run on a pool of their own."""
    service = Service(config_factory(first_message_seconds=0), max_workers=2)  # type: ignore[arg-type]
    address = service.listen(f"unix:{short_tmp}/lanes.sock")
    service.start()
    release = threading.Event()
    try:
        with SandboxClient(address, retry_seconds=2.0) as operator:
            calls = [
                operator.sandboxes.PutFiles.future(_never_sends(release), timeout=60)
                for _ in range(4)
            ]
            with grpc.insecure_channel(address) as channel:
                probe = health_pb2_grpc.HealthStub(channel)
                answer = probe.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert isinstance(operator.list_sandboxes(), list)
            assert operator.server_info().base_image == base_image
            release.set()
            for call in calls:
                with contextlib.suppress(grpc.RpcError):
                    call.result(timeout=30)
    finally:
        release.set()
        service.stop(grace=2.0)
