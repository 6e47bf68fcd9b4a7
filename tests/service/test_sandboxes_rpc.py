"""SandboxService over a real channel against the real engine."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import ExecResult, OutputChunk, Sandbox, SandboxRequest, requested_limits
from sandboxd.archives import tar_of
from sandboxd.client import SandboxClient
from sandboxd.limits import GiB, Limits, MiB
from sandboxd.wire import request_to_pb


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return info.value


def run(
    client: SandboxClient, sandbox_id: str, *argv: str, **kw: object
) -> tuple[str, str, ExecResult]:
    out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    result = client.exec(
        sandbox_id,
        list(argv),
        on_output=lambda s, d: out[s].extend(d),
        **kw,  # type: ignore[arg-type]
    )
    return out["stdout"].decode(), out["stderr"].decode(), result


def test_create_get_list_destroy(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    box = client.create_sandbox(
        SandboxRequest(limits=limits_factory(pids=48), labels={"suite": "service"}, ttl_seconds=120)
    )
    try:
        assert box.state == "running"
        assert box.limits.pids == 48
        assert box.limits.memory_bytes == 128 * MiB
        assert box.image_digest.startswith("sha256:")
        assert 100 < box.expires_unix - box.created_unix <= 121
        got = client.get_sandbox(box.id)
        assert got.container_id == box.container_id
        assert box.id in {s.id for s in client.list_sandboxes()}
    finally:
        client.destroy_sandbox(box.id, missing_ok=False)
    assert box.id not in {s.id for s in client.list_sandboxes()}
    err = rpc_error(lambda: client.sandboxes.GetSandbox(pb.GetSandboxRequest(sandbox_id=box.id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("limits", "field", "cap"),
    [
        (requested_limits(memory_bytes=64 * GiB), "limits.memory_bytes", "cap of 8 GiB"),
        (requested_limits(cpus=64), "limits.cpus", "cap of 4.0"),
        (requested_limits(pids=1_000_000), "limits.pids", "cap of 4096"),
        (requested_limits(timeout_seconds=1e6), "limits.timeout_seconds", "cap of 3600s"),
        (requested_limits(memory_bytes=-1), "limits.memory_bytes", "must not be negative"),
        (requested_limits(cpus=-0.5), "limits.cpus", "must not be negative"),
        (requested_limits(pids=-1), "limits.pids", "must not be negative"),
        (requested_limits(network=True), "limits.network", "does not allow network"),
    ],
)
def test_bad_limits_are_invalid_argument_naming_field_and_cap(
    client: SandboxClient, limits: Limits, field: str, cap: str
) -> None:
    before = {s.id for s in client.list_sandboxes()}
    request = pb.CreateSandboxRequest(spec=request_to_pb(SandboxRequest(limits=limits)))
    err = rpc_error(lambda: client.sandboxes.CreateSandbox(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()
    assert cap in err.details()
    assert {s.id for s in client.list_sandboxes()} == before


def test_bad_ttl_env_and_image_are_refused(client: SandboxClient) -> None:
    for spec, code, why in [
        (SandboxRequest(ttl_seconds=1e9), grpc.StatusCode.INVALID_ARGUMENT, "spec.ttl_seconds"),
        (SandboxRequest(env={"1X": "y"}), grpc.StatusCode.INVALID_ARGUMENT, "spec.env"),
        (SandboxRequest(image="no-such-image:here"), grpc.StatusCode.NOT_FOUND, "no-such-image"),
    ]:
        request = pb.CreateSandboxRequest(spec=request_to_pb(spec))
        err = rpc_error(lambda r=request: client.sandboxes.CreateSandbox(r))  # type: ignore[misc]
        assert err.code() == code, spec
        assert why in err.details()


def test_unknown_sandbox_is_not_found_everywhere(client: SandboxClient) -> None:
    sid = "0123456789abcdef"
    calls: list[Callable[[], object]] = [
        lambda: client.sandboxes.GetSandbox(pb.GetSandboxRequest(sandbox_id=sid)),
        lambda: client.sandboxes.DestroySandbox(pb.DestroySandboxRequest(sandbox_id=sid)),
        lambda: client.sandboxes.Exec(pb.ExecRequest(sandbox_id=sid, argv=["true"])),
        lambda: client.sandboxes.GetFiles(pb.GetFilesRequest(sandbox_id=sid, path="x")),
        lambda: client.sandboxes.PutFiles(
            iter(
                [
                    pb.PutFilesRequest(header=pb.PutFilesHeader(sandbox_id=sid)),
                    pb.PutFilesRequest(tar_chunk=tar_of({"a": "b"})),
                ]
            )
        ),
    ]
    for call in calls:
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        assert sid in err.details()


def test_exec_streams_output_with_stdin_env_and_workdir(
    client: SandboxClient, sandbox: Sandbox
) -> None:
    events = list(
        client.exec_stream(
            sandbox.id,
            ["sh", "-c", 'cat; echo "$GREETING from $(pwd)"; echo oops >&2; exit 0'],
            stdin=b"fed through stdin\n",
            env={"GREETING": "hello"},
            workdir="/tmp",
            timeout=10,
        )
    )
    result = events[-1]
    assert isinstance(result, ExecResult)
    chunks = [e for e in events[:-1] if isinstance(e, OutputChunk)]
    out = b"".join(e.data for e in chunks if e.stream == "stdout")
    err = b"".join(e.data for e in chunks if e.stream == "stderr")
    assert out == b"fed through stdin\nhello from /tmp\n"
    assert err == b"oops\n"
    assert (result.verdict, result.exit_code) == ("ok", 0)
    assert result.stdout_bytes == len(out) and result.stderr_bytes == len(err)


def test_exec_output_arrives_while_the_command_runs(
    client: SandboxClient, sandbox: Sandbox
) -> None:
    # The command cannot end before the test has seen its first line and answered it, so
    # the first line arriving at all proves it was streamed (buffered output would make
    # the command wait for its timeout and end timed_out).
    script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo second"
    stream = client.exec_stream(sandbox.id, ["sh", "-c", script], timeout=20)
    first = next(stream)
    assert isinstance(first, OutputChunk) and first.data == b"first\n"
    _, _, touched = run(client, sandbox.id, "touch", "/tmp/go")
    assert touched.verdict == "ok", touched
    rest = list(stream)
    assert b"".join(e.data for e in rest if isinstance(e, OutputChunk)) == b"second\n"
    assert isinstance(rest[-1], ExecResult) and rest[-1].verdict == "ok", rest[-1]


def test_exec_verdicts(client: SandboxClient, sandbox: Sandbox) -> None:
    _, _, r = run(client, sandbox.id, "sh", "-c", "exit 7")
    assert (r.verdict, r.exit_code, r.message) == ("nonzero_exit", 7, "exited with code 7")

    _, _, r = run(client, sandbox.id, "sleep", "30", timeout=1.0)
    assert r.verdict == "timed_out"
    assert 1.0 <= r.wall_seconds < 30, r  # stopped at its timeout, not at the command's end
    assert r.message == "timed out after 1.0s"

    out, _, r = run(client, sandbox.id, "sh", "-c", "yes | head -c 100000", output_limit=1000)
    assert r.verdict == "output_truncated" and r.output_truncated
    assert len(out) == 1000

    # The sandbox survives all of that.
    _, _, r = run(client, sandbox.id, "true")
    assert r.verdict == "ok"


def test_exec_limits_above_the_sandboxs_are_refused(
    client: SandboxClient, sandbox: Sandbox
) -> None:
    for request, field in [
        (
            pb.ExecRequest(sandbox_id=sandbox.id, argv=["true"], timeout_seconds=1000),
            "timeout_seconds",
        ),
        (
            pb.ExecRequest(sandbox_id=sandbox.id, argv=["true"], timeout_seconds=-1),
            "timeout_seconds",
        ),
        (pb.ExecRequest(sandbox_id=sandbox.id, argv=[]), "argv"),
        (
            pb.ExecRequest(sandbox_id=sandbox.id, argv=["true"], output_limit_bytes=1 << 40),
            "output_limit_bytes",
        ),
    ]:
        err = rpc_error(lambda r=request: client.sandboxes.Exec(r))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert field in err.details()


def _names(tar_data: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_data)) as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                out[member.name] = f.read()
    return out


def test_put_and_get_files_round_trip(client: SandboxClient, sandbox: Sandbox) -> None:
    files = {"src/a.py": "print('a')\n", "data.bin": bytes(range(256)) * 10}
    resp = client.put_files(sandbox.id, "project", files)
    assert (resp.files, resp.bytes) == (2, len("print('a')\n") + 2560)
    out, _, r = run(
        client, sandbox.id, "sh", "-c", "cat project/src/a.py; id -u; stat -c %U project/data.bin"
    )
    assert r.verdict == "ok"
    assert out.splitlines()[0] == "print('a')"

    got = _names(client.get_files(sandbox.id, "project"))
    assert got == {"project/src/a.py": b"print('a')\n", "project/data.bin": bytes(range(256)) * 10}

    client.put_files(sandbox.id, "/tmp/deep/er", {"t.txt": "tmp"})
    assert _names(client.get_files(sandbox.id, "/tmp/deep/er/t.txt")) == {"t.txt": b"tmp"}


@pytest.mark.parametrize("path", ["../etc", "/etc", "/", "/tmp/../etc", "/sandbox", "a/../../b"])
def test_paths_escaping_the_sandbox_are_invalid_argument(
    client: SandboxClient, sandbox: Sandbox, path: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match="path: "):
        client.put_files(sandbox.id, path, tar_of({"x": "y"}))
    get = pb.GetFilesRequest(sandbox_id=sandbox.id, path=path)
    err = rpc_error(lambda: client.sandboxes.GetFiles(get))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "path" in err.details()


def test_tar_members_escaping_the_destination_are_invalid_argument(
    client: SandboxClient, sandbox: Sandbox
) -> None:
    for name in ["../escape.txt", "/abs.txt"]:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        with pytest.raises(errors.InvalidArgument, match="tar member"):
            client.put_files(sandbox.id, "", buf.getvalue())


def test_get_missing_file_is_not_found(client: SandboxClient, sandbox: Sandbox) -> None:
    err = rpc_error(
        lambda: client.sandboxes.GetFiles(
            pb.GetFilesRequest(sandbox_id=sandbox.id, path="nope.txt")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "nope.txt" in err.details()


def test_run_builds_puts_runs_collects_and_destroys(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    request = pb.RunRequest(
        spec=request_to_pb(SandboxRequest(limits=limits_factory())),
        files_tar=tar_of({"in.txt": "21\n"}),
        argv=["sh", "-c", "echo $(( $(cat in.txt) * 2 )) | tee out.txt"],
        collect=["out.txt"],
    )
    before = {s.id for s in client.list_sandboxes()}
    events = list(client.sandboxes.Run(request, timeout=60))
    result = events[-1].result
    out = b"".join(e.output.data for e in events[:-1] if e.HasField("output"))
    assert out == b"42\n"
    assert result.exec.verdict == pb.VERDICT_OK
    assert _names(result.collected_tar) == {"out.txt": b"42\n"}
    assert {s.id for s in client.list_sandboxes()} == before, "Run destroys its sandbox"


def test_run_with_a_build(client: SandboxClient, limits_factory: Callable[..., Limits]) -> None:
    request = pb.RunRequest(
        spec=request_to_pb(SandboxRequest(limits=limits_factory())),
        build=pb.BuildImageRequest(fragment="RUN echo baked-in > /baked.txt"),
        argv=["cat", "/baked.txt"],
    )
    events = list(client.sandboxes.Run(request, timeout=120))
    result = events[-1].result
    try:
        assert result.exec.verdict == pb.VERDICT_OK
        assert b"".join(e.output.data for e in events if e.HasField("output")) == b"baked-in\n"
        assert len(result.image.key) == 64
    finally:
        client.delete_image(result.image.key)


def test_ttl_reaper_destroys_abandoned_sandboxes(
    base_image: str, short_tmp: object, config_factory: Callable[..., object]
) -> None:
    from sandboxd.server import create_server

    svc, address = create_server(
        config_factory(reap_interval_seconds=0.5),
        f"unix:{short_tmp}/ttl.sock",  # type: ignore[arg-type]
    )
    try:
        with SandboxClient(address, retry_seconds=2) as c:
            box = c.create_sandbox(
                SandboxRequest(ttl_seconds=1.0, limits=requested_limits(memory_bytes=64 * MiB))
            )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and box.id in {s.id for s in c.list_sandboxes()}:
                time.sleep(0.2)
            assert box.id not in {s.id for s in c.list_sandboxes()}
            err = rpc_error(lambda: c.sandboxes.GetSandbox(pb.GetSandboxRequest(sandbox_id=box.id)))
            assert err.code() == grpc.StatusCode.NOT_FOUND
    finally:
        svc.stop(grace=1.0)
