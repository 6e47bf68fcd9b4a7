"""The client's domain side: records instead of wire messages, and `sandbox()`, which
always destroys what it made."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sandboxd import errors
from sandboxd.api import ExecResult, OutputChunk, SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.limits import Limits


def _ids(client: SandboxClient) -> set[str]:
    return {s.id for s in client.list_sandboxes()}


def test_sandbox_block_runs_puts_gets_and_destroys(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    before = _ids(client)
    request = SandboxRequest(limits=limits_factory(), labels={"suite": "client"})
    with client.sandbox(request) as box:
        assert box.id in _ids(client)
        assert box.sandbox.state == "running"
        assert box.sandbox.request.labels == {"suite": "client"}
        put = box.put_files("", {"in.txt": "21\n", "bin/x": b"\x00\x01"})
        assert (put.files, put.bytes) == (2, 5)
        seen: list[tuple[str, bytes]] = []
        result = box.exec(
            ["sh", "-c", "echo $(( $(cat in.txt) * 2 )) | tee out.txt; echo e >&2"],
            on_output=lambda stream, data: seen.append((stream, data)),
        )
        assert isinstance(result, ExecResult)
        assert (result.verdict, result.exit_code, result.info.finished) == ("ok", 0, True)
        assert b"".join(d for s, d in seen if s == "stdout") == b"42\n"
        assert b"".join(d for s, d in seen if s == "stderr") == b"e\n"
        assert box.get_files("out.txt")  # a tar holding the file
        events = list(box.exec_stream(["sh", "-c", "exit 3"]))
        assert all(isinstance(e, OutputChunk) for e in events[:-1])
        last = events[-1]
        assert isinstance(last, ExecResult) and last.verdict == "nonzero_exit"
    assert _ids(client) == before


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_sandbox_block_destroys_on_an_error_or_ctrl_c(
    client: SandboxClient, limits_factory: Callable[..., Limits], exc: BaseException
) -> None:
    before = _ids(client)
    request = SandboxRequest(limits=limits_factory())
    with pytest.raises(type(exc)), client.sandbox(request) as box:
        assert box.id in _ids(client)
        raise exc
    assert _ids(client) == before


def test_a_failed_destroy_does_not_hide_the_blocks_own_error(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    request = SandboxRequest(limits=limits_factory())
    with pytest.raises(RuntimeError, match="the block's own"), client.sandbox(request) as box:
        client.destroy_sandbox(box.id)
        box.client = _Refusing(client)  # type: ignore[assignment]
        raise RuntimeError("the block's own error")


class _Refusing:
    """A client whose destroy fails, as a service that went away would."""

    def __init__(self, client: SandboxClient) -> None:
        self.client = client

    def destroy_sandbox(self, sandbox_id: str) -> None:
        raise errors.EngineUnavailable("sandboxd is not reachable")


def test_kept_sandboxes_outlive_the_block(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    with client.sandbox(SandboxRequest(limits=limits_factory())) as box:
        box.keep()
    try:
        assert box.id in _ids(client)
    finally:
        client.destroy_sandbox(box.id)
    assert box.id not in _ids(client)


def test_zero_limits_take_the_servers_defaults(client: SandboxClient) -> None:
    defaults = client.server_info().defaults
    with client.sandbox(SandboxRequest()) as box:
        assert box.sandbox.limits.memory_bytes == defaults.memory_bytes
        assert box.sandbox.limits.timeout_seconds == defaults.timeout_seconds
