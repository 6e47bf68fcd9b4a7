"""Hostile requests against a real server: every one gets a real status and a message.

Never UNKNOWN or INTERNAL, the service stays healthy, and nothing outside the service's
own dirs on the host is touched.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandboxd.config import load_config
from sandboxd.limits import Limits
from sandboxd.server import create_server

pytestmark = pytest.mark.docker

BASE_IMAGE = os.environ.get("SANDBOXD_TEST_BASE_IMAGE", "sandbox-base:bookworm")
SCRATCH = 16 << 20
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@pytest.fixture(scope="module")
def canary() -> Iterator[Path]:
    """Host files a request might try to reach; they must never change."""
    root = Path(tempfile.mkdtemp(prefix="sbx-canary-", dir="/tmp"))
    (root / "secret.txt").write_text("do not touch")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _fingerprint(paths: list[Path]) -> dict[str, tuple[int, float, str]]:
    out = {}
    for path in paths:
        for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
            st_ = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            out[str(p)] = (st_.st_size, st_.st_mtime, digest)
    return out


@pytest.fixture(scope="module")
def server(
    canary: Path, instance_id_factory: Callable[[], str]
) -> Iterator[tuple[pb_grpc.SandboxServiceStub, str, grpc.Channel]]:
    subprocess.run(["docker", "image", "inspect", BASE_IMAGE], check=True, capture_output=True)
    workdir = Path(tempfile.mkdtemp(prefix="sbx-h-", dir="/tmp"))
    config = load_config(
        None,
        base_image=BASE_IMAGE,
        pool_max_per_key=0,
        defaults=Limits(memory_bytes=64 << 20, scratch_bytes=SCRATCH, timeout_seconds=20),
        state_dir=workdir / "state",
        instance_id=instance_id_factory(),  # so the session-end leftover check sees it
    )
    service, address = create_server(config, f"unix:{workdir}/s.sock")
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.SandboxServiceStub(channel)
    sandbox = stub.CreateSandbox(pb.CreateSandboxRequest(spec=pb.SandboxSpec()), timeout=60)
    try:
        yield stub, sandbox.id, channel
    finally:
        channel.close()
        service.stop(grace=2)
        shutil.rmtree(workdir, ignore_errors=True)


def _check(call, *args) -> object:
    """Run one call; a failure must carry a specific status and a message."""
    try:
        result = call(*args)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            result = list(result)
        return result
    except grpc.RpcError as exc:
        assert exc.code() not in BAD, (exc.code(), exc.details())
        assert exc.details(), exc.code()
        return exc


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", link: str = ""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def hostile_tars(canary: Path) -> list[bytes]:
    target = str(canary / "secret.txt")
    return [
        _tar([_member("../../../../" + target.lstrip("/"))]),
        _tar([_member(target)]),
        _tar([_member("link", tarfile.SYMTYPE, link=target), _member("link", data=b"pwn")]),
        _tar([_member("up", tarfile.SYMTYPE, link="../../../../tmp")]),
        _tar([_member("hard", tarfile.LNKTYPE, link=target)]),
        _tar([_member("dev", tarfile.CHRTYPE)]),
        _tar([_member("blk", tarfile.BLKTYPE)]),
        _tar([_member("fifo", tarfile.FIFOTYPE)]),
        _tar([_member("nul\x00name")]),
        _tar([_member("é/ünï/cödé.txt", data="ü".encode())]),
        b"this is not a tar archive" * 100,
        b"",
        b"\x00" * 10240,
    ]


def _put(stub, sandbox_id: str, path: str, data: bytes, chunk: int = 1 << 20):
    def requests():
        yield pb.PutFilesRequest(header=pb.PutFilesHeader(sandbox_id=sandbox_id, path=path))
        for i in range(0, len(data), chunk):
            yield pb.PutFilesRequest(tar_chunk=data[i : i + chunk])

    return _check(lambda: stub.PutFiles(requests(), timeout=120))


texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "..", "../..", "/", "/etc/passwd", "/tmp/../etc", "a\x00b", "x" * 4097]),
    st.just("\u202e\U0001f4a3" * 10),
)
big_text = st.just("y" * (1 << 20))
numbers = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**62]),
)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0]))


@st.composite
def limits(draw) -> pb.Limits:
    return pb.Limits(
        cpus=draw(floats),
        memory_bytes=draw(numbers),
        pids=draw(numbers),
        scratch_bytes=draw(numbers),
        network=draw(st.booleans()),
        timeout_seconds=draw(floats),
        output_bytes=draw(numbers),
    )


@st.composite
def specs(draw) -> pb.SandboxSpec:
    return pb.SandboxSpec(
        image=draw(st.one_of(texts, st.just(BASE_IMAGE))),
        limits=draw(limits()),
        env=draw(st.dictionaries(texts, st.one_of(texts, big_text), max_size=3)),
        workdir=draw(texts),
        runtime=draw(st.sampled_from(["", "runc", "nope", "runsc\x00"])),
        ttl_seconds=draw(floats),
        profile=draw(st.sampled_from(["", "default", "untrusted", "root", "x" * 1000])),
        labels=draw(st.dictionaries(texts, texts, max_size=3)),
    )


@st.composite
def exec_requests(draw, sandbox_id: str) -> pb.ExecRequest:
    return pb.ExecRequest(
        sandbox_id=draw(st.one_of(st.just(sandbox_id), texts)),
        argv=draw(st.lists(st.one_of(texts, big_text), max_size=3)),
        stdin=draw(st.sampled_from([b"", b"\x00" * 10, b"z" * (1 << 20)])),
        timeout_seconds=draw(st.one_of(floats, st.sampled_from([0.5, 1.0]))),
        output_limit_bytes=draw(numbers),
        env=draw(st.dictionaries(texts, texts, max_size=2)),
        workdir=draw(texts),
    )


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(data=st.data())
def test_hostile_requests_get_a_real_status(server, canary, data) -> None:
    stub, sandbox_id, _ = server
    before = _fingerprint([canary, Path("/etc/passwd"), Path("/etc/hostname")])
    action = data.draw(st.sampled_from(["create", "exec", "get", "put", "lookup"]))
    if action == "create":
        result = _check(stub.CreateSandbox, pb.CreateSandboxRequest(spec=data.draw(specs())))
        if isinstance(result, pb.Sandbox):
            stub.DestroySandbox(pb.DestroySandboxRequest(sandbox_id=result.id), timeout=60)
    elif action == "exec":
        request = data.draw(exec_requests(sandbox_id))
        _check(lambda: stub.Exec(request, timeout=60))
    elif action == "get":
        request = pb.GetFilesRequest(
            sandbox_id=data.draw(st.one_of(st.just(sandbox_id), texts)),
            path=data.draw(texts),
            max_bytes=data.draw(numbers),
        )
        _check(lambda: stub.GetFiles(request, timeout=60))
    elif action == "put":
        tar = data.draw(st.sampled_from(hostile_tars(canary)))
        _put(stub, sandbox_id, data.draw(st.one_of(st.just(""), texts)), tar)
    else:
        _check(stub.GetSandbox, pb.GetSandboxRequest(sandbox_id=data.draw(texts)))
        _check(stub.DestroySandbox, pb.DestroySandboxRequest(sandbox_id=data.draw(texts)))
    assert _fingerprint([canary, Path("/etc/passwd"), Path("/etc/hostname")]) == before
    # The shared sandbox and the service are still fine.
    sandbox = stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=sandbox_id), timeout=10)
    assert sandbox.state == pb.SANDBOX_STATE_RUNNING


def test_ten_thousand_tiny_files_and_a_file_larger_than_scratch(server) -> None:
    stub, sandbox_id, _ = server
    many = _tar([_member(f"d{i // 1000}/f{i}", data=b"") for i in range(10_000)])
    result = _put(stub, sandbox_id, "/tmp/many", many)
    assert isinstance(result, pb.PutFilesResponse) and result.files == 10_000, result

    # 64 MiB declared and sent against a 16 MiB scratch: refused, not unpacked.
    info = tarfile.TarInfo("big.bin")
    info.size = 64 << 20
    big = info.tobuf() + b"\0" * info.size + b"\0" * 1024
    result = _put(stub, sandbox_id, "", big)
    assert isinstance(result, grpc.RpcError), result
    assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, result.details()

    exec_result = [
        e
        for e in stub.Exec(
            pb.ExecRequest(sandbox_id=sandbox_id, argv=["sh", "-c", "ls /sandbox/work"]),
            timeout=60,
        )
    ]
    assert exec_result[-1].result.verdict == pb.VERDICT_OK
    assert b"big.bin" not in b"".join(e.output.data for e in exec_result)
