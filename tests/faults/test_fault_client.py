"""A lost or frozen service turns into clear client errors, never a hang."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import SandboxRequest
from sandboxd.client import SandboxClient


def test_service_killed_mid_exec_is_a_prompt_unavailable(sandboxd) -> None:
    proc = sandboxd()
    with SandboxClient(proc.address, retry_seconds=1.0) as client:
        sandbox = client.create_sandbox(SandboxRequest(ttl_seconds=60))
        threading.Timer(1.0, proc.kill9).start()
        started = time.monotonic()
        with pytest.raises(errors.SandboxError) as caught:
            client.exec(sandbox.id, ["sleep", "600"])  # timeout 0: the sandbox's own
        assert time.monotonic() - started < 15
        assert caught.value.code == "UNAVAILABLE", caught.value
        # Safe calls retry for retry_seconds, then say plainly what is wrong.
        started = time.monotonic()
        with pytest.raises(errors.EngineUnavailable):
            client.list_sandboxes()
        assert time.monotonic() - started < 10


def test_frozen_service_calls_end_at_their_deadline(sandboxd) -> None:
    proc = sandboxd()
    with SandboxClient(proc.address, retry_seconds=1.0) as client:
        client.health()
        proc.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(errors.SandboxError) as caught:
                client._call(client.sandboxes.ListSandboxes, pb.ListSandboxesRequest(), timeout=2)
            assert time.monotonic() - started < 6
            assert caught.value.code == "DEADLINE_EXCEEDED"
            with pytest.raises(errors.SandboxError):
                client.health(timeout=1.0)
        finally:
            proc.signal(signal.SIGCONT)
        assert client.health() == "SERVING"
