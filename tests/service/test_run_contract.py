"""Exec and Run as a client in another language sees them (issue 12, faults 1, 2 and 4):
programs in the scratch run, an engine-side start failure is a result, collected paths
come back as one tar with the missing ones listed."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable

import grpc
import pytest

from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import Sandbox, SandboxRequest
from sandboxd.archives import tar_of
from sandboxd.client import SandboxClient
from sandboxd.limits import Limits
from sandboxd.wire import request_to_pb

SCRIPT = "printf '#!/bin/sh\\necho hi from $0\\n' > {path}; chmod +x {path}; {path}"


def exec_events(client: SandboxClient, sandbox_id: str, argv: list[str]) -> list[pb.ExecEvent]:
    request = pb.ExecRequest(sandbox_id=sandbox_id, argv=argv)
    return list(client.sandboxes.Exec(request, timeout=60))


def stdout_of(events: list[pb.ExecEvent]) -> bytes:
    return b"".join(
        e.output.data
        for e in events
        if e.HasField("output") and e.output.stream == pb.STREAM_STDOUT
    )


@pytest.mark.parametrize("path", ["./x.sh", "/tmp/x.sh"])
def test_a_program_written_to_the_scratch_runs(
    client: SandboxClient, sandbox: Sandbox, path: str
) -> None:
    events = exec_events(client, sandbox.id, ["sh", "-c", SCRIPT.format(path=path)])
    result = events[-1].result
    assert result.verdict == pb.VERDICT_OK, result.message
    assert stdout_of(events) == f"hi from {path}\n".encode()


def test_the_scratch_keeps_nosuid_and_nodev(client: SandboxClient, sandbox: Sandbox) -> None:
    argv = ["sh", "-c", "grep -E ' (/tmp|/sandbox/work) ' /proc/mounts"]
    mounts = stdout_of(exec_events(client, sandbox.id, argv)).decode().splitlines()
    assert len(mounts) == 2, mounts
    for line in mounts:
        options = line.split()[3].split(",")
        assert "nosuid" in options and "nodev" in options, line
        assert "noexec" not in options, line


def test_a_missing_command_is_127_with_a_message_and_no_engine_text(
    client: SandboxClient, sandbox: Sandbox
) -> None:
    events = exec_events(client, sandbox.id, ["no-such-command-xyz", "arg"])
    result = events[-1].result
    assert not any(e.HasField("output") for e in events), events[:-1]
    assert result.exit_code == 127
    assert result.verdict == pb.VERDICT_NONZERO_EXIT
    assert "no-such-command-xyz" in result.message
    assert "not found" in result.message
    assert "OCI" not in result.message


def test_a_command_that_is_not_executable_is_126_with_a_message(
    client: SandboxClient, sandbox: Sandbox
) -> None:
    events = exec_events(client, sandbox.id, ["/etc/passwd"])
    result = events[-1].result
    assert not any(e.HasField("output") for e in events), events[:-1]
    assert result.exit_code == 126
    assert result.verdict == pb.VERDICT_NONZERO_EXIT
    assert "/etc/passwd" in result.message and "permission denied" in result.message


def test_a_command_printing_the_engine_s_words_keeps_its_output(
    client: SandboxClient, sandbox: Sandbox
) -> None:
    text = "OCI runtime exec failed: not really\n"
    events = exec_events(client, sandbox.id, ["sh", "-c", f"printf '{text}'; exit 126"])
    assert stdout_of(events) == text.encode()
    assert events[-1].result.exit_code == 126
    assert events[-1].result.message == "exited with code 126"


def run(client: SandboxClient, request: pb.RunRequest) -> list[pb.RunEvent]:
    return list(client.sandboxes.Run(request, timeout=120))


def members(archive: bytes) -> dict[str, bytes]:
    """Every file in the archive, read the way a standard tar reader does (the first
    end-of-archive marker ends it)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                out[member.name] = extracted.read()
    return out


def test_run_collects_every_path_into_one_tar(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    spec = request_to_pb(SandboxRequest(limits=limits_factory()))
    script = "echo one > a.txt; mkdir -p d; echo two > d/b.txt; echo three > /tmp/c.txt"
    request = pb.RunRequest(
        spec=spec, argv=["sh", "-c", script], collect=["a.txt", "d", "/tmp/c.txt"]
    )
    result = run(client, request)[-1].result
    assert result.exec.verdict == pb.VERDICT_OK, result.exec.message
    assert members(result.collected_tar) == {
        "a.txt": b"one\n",
        "d/b.txt": b"two\n",
        "c.txt": b"three\n",
    }
    assert list(result.missing_paths) == []


def test_a_missing_collect_path_is_reported_and_the_result_kept(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    spec = request_to_pb(SandboxRequest(limits=limits_factory()))
    request = pb.RunRequest(
        spec=spec,
        files_tar=tar_of({"in.txt": "x"}),
        argv=["sh", "-c", "echo out > out.txt; echo done; exit 3"],
        collect=["nope.txt", "out.txt", "/tmp/absent"],
    )
    events = run(client, request)
    result = events[-1].result
    assert b"".join(e.output.data for e in events if e.HasField("output")) == b"done\n"
    assert result.exec.exit_code == 3
    assert result.exec.verdict == pb.VERDICT_NONZERO_EXIT
    assert members(result.collected_tar) == {"out.txt": b"out\n"}
    assert list(result.missing_paths) == ["/sandbox/work/nope.txt", "/tmp/absent"]


def test_run_with_only_missing_paths_gives_an_empty_archive(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    spec = request_to_pb(SandboxRequest(limits=limits_factory()))
    request = pb.RunRequest(spec=spec, argv=["true"], collect=["gone"])
    result = run(client, request)[-1].result
    assert result.exec.verdict == pb.VERDICT_OK
    assert members(result.collected_tar) == {}
    assert list(result.missing_paths) == ["/sandbox/work/gone"]


def test_a_bad_collect_path_is_refused_before_the_command_runs(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    spec = request_to_pb(SandboxRequest(limits=limits_factory()))
    request = pb.RunRequest(spec=spec, argv=["echo", "ran"], collect=["ok.txt", "../etc"])
    seen: list[pb.RunEvent] = []
    with pytest.raises(grpc.RpcError) as info:
        seen.extend(client.sandboxes.Run(request, timeout=120))
    assert not any(e.HasField("output") for e in seen), "the command ran"
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "collect: '../etc' must not contain '..'" in info.value.details()


def test_run_without_collect_paths_returns_no_archive(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    spec = request_to_pb(SandboxRequest(limits=limits_factory()))
    result = run(client, pb.RunRequest(spec=spec, argv=["true"]))[-1].result
    assert result.exec.verdict == pb.VERDICT_OK
    assert result.collected_tar == b""
    assert list(result.missing_paths) == []
