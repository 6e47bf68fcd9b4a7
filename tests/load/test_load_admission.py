"""Admission control: a bounded queue with a deadline, a retry hint, and a memory budget."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from sandboxd_process import containers_of, wait_until

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandboxd.api import Sandbox, SandboxRequest, requested_limits
from sandboxd.client import SandboxClient
from sandboxd.wire import request_to_pb

MiB = 1 << 20


def _spec(memory: int = 64 * MiB) -> SandboxRequest:
    return SandboxRequest(limits=requested_limits(memory_bytes=memory), ttl_seconds=120)


def test_full_service_queues_then_answers_resource_exhausted_with_a_retry_hint(sandboxd) -> None:
    proc = sandboxd(
        {"caps": {"sandboxes": 2}, "admission_timeout_seconds": 3.0, "pool_max_per_key": 0}
    )
    with SandboxClient(proc.address) as client:
        held = [client.create_sandbox(_spec()) for _ in range(2)]

        # A waiter gets the slot a destroy frees, well before its deadline.
        got: list[Sandbox] = []
        waiter = threading.Thread(target=lambda: got.append(client.create_sandbox(_spec())))
        waiter.start()
        time.sleep(0.5)
        client.destroy_sandbox(held.pop().id)
        waiter.join(timeout=30)
        # Its queue deadline is 3 s; refused at it, the thread would leave `got` empty.
        assert got, "the queued create never got the freed slot"
        held += got

        # Nobody frees a slot: the create waits out the queue deadline, then is refused.
        channel = grpc.insecure_channel(proc.address)
        try:
            stub = pb_grpc.SandboxServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.CreateSandbox(pb.CreateSandboxRequest(spec=request_to_pb(_spec())), timeout=30)
            waited = time.monotonic() - started
        finally:
            channel.close()
        rpc_error = caught.value
        assert rpc_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "slots are in use" in rpc_error.details()
        trailers = dict(rpc_error.trailing_metadata())
        assert float(trailers["retry-after"]) > 0
        assert waited >= 2.5, waited  # it queued until its deadline first

        # The client hands the hint on.
        with pytest.raises(errors.ResourceExhausted) as refused:
            client.create_sandbox(_spec())
        assert refused.value.retry_after is not None and refused.value.retry_after > 0

        for sandbox in held:
            client.destroy_sandbox(sandbox.id)
    assert wait_until(lambda: containers_of(proc.instance_id) == [], 30)


def test_memory_budget_is_never_overcommitted(sandboxd) -> None:
    proc = sandboxd(
        {
            "caps": {"sandboxes": 8},
            "memory_budget_bytes": "160m",
            "admission_timeout_seconds": 1.0,
            # Warm containers are budgeted apart (pool_memory_budget_bytes); off here.
            "pool_max_per_key": 0,
        }
    )
    with SandboxClient(proc.address) as client:
        held = [client.create_sandbox(_spec(64 * MiB)) for _ in range(2)]

        # 128 MiB committed: another 64 MiB does not fit; it waits, then is refused.
        started = time.monotonic()
        with pytest.raises(errors.ResourceExhausted) as refused:
            client.create_sandbox(_spec(64 * MiB))
        assert time.monotonic() - started >= 0.9
        assert "memory budget" in refused.value.message
        assert refused.value.retry_after

        # More than the whole budget can never fit: refused at once, without a hint.
        with pytest.raises(errors.ResourceExhausted) as too_big:
            client.create_sandbox(_spec(256 * MiB))
        assert "whole memory budget" in too_big.value.message
        assert too_big.value.retry_after is None, "refused before queueing, so no hint"

        # Still fits: 32 MiB more.
        held.append(client.create_sandbox(_spec(32 * MiB)))
        committed = sum(s.limits.memory_bytes for s in client.list_sandboxes())
        assert committed <= 160 * MiB

        client.destroy_sandbox(held.pop(0).id)
        held.append(client.create_sandbox(_spec(64 * MiB)))
        for sandbox in held:
            client.destroy_sandbox(sandbox.id)
    assert wait_until(lambda: containers_of(proc.instance_id) == [], 30)
