"""Hostile requests: escapes through file transfer, oversized and malformed messages."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest
from abuse import SecureService, run, verdict

from sandboxd import errors
from sandboxd.api import Sandbox, SandboxRequest, requested_limits
from sandboxd.client import SandboxClient

Box = Callable[..., AbstractContextManager[Sandbox]]


def _tar(*members: tuple[str, str, bytes]) -> bytes:
    """(kind, name, data-or-link-target) members: kind is file, symlink or hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = data.decode()
            tar.addfile(info)
    return buf.getvalue()


def test_put_and_get_cannot_escape_the_sandbox_dirs(
    operator: SandboxClient, box: Box, runtime: str
) -> None:
    host_passwd = Path("/etc/passwd").read_bytes()
    with box() as sandbox:
        refused = [
            _tar(("file", "../escape", b"x")),
            _tar(("file", "/etc/escape", b"x")),
            _tar(("file", "a/../../escape", b"x")),
            _tar(("symlink", "link", b"/etc/passwd")),
            _tar(("symlink", "link", b"../../../etc")),
            _tar(("hardlink", "hard", b"/etc/passwd")),
            b"this is not a tar archive" * 100,
        ]
        for data in refused:
            with pytest.raises(errors.InvalidArgument):
                operator.put_files(sandbox.id, "", data)
        for path in ("/etc", "/etc/shadow", "../../etc/passwd", "/tmp/../etc", "/proc/1/root"):
            with pytest.raises(errors.InvalidArgument):
                operator.put_files(sandbox.id, path, _tar(("file", "x", b"x")))
            with pytest.raises(errors.InvalidArgument):
                operator.get_files(sandbox.id, path)
        # A link the code makes inside points out of the scratch dir: writing through it
        # meets the read-only root, reading through it returns the link, never its target.
        _, _, made = run(operator, sandbox.id, "ln -s /etc out && ln -s /etc/passwd pw")
        assert verdict(made) == "ok", made
        with pytest.raises((errors.FailedPrecondition, errors.ResourceExhausted)):
            operator.put_files(sandbox.id, "out", _tar(("file", "escape", b"x")))
        got = operator.get_files(sandbox.id, "pw")
        with tarfile.open(fileobj=io.BytesIO(got)) as tar:
            members = tar.getmembers()
        assert [(m.name, m.issym()) for m in members] == [("pw", True)]
        assert Path("/etc/passwd").read_bytes() == host_passwd
        assert not Path("/etc/escape").exists() and not Path("/escape").exists()


def test_huge_and_malformed_requests_are_refused(
    operator: SandboxClient, secure: SecureService, box: Box, runtime: str
) -> None:
    with box() as sandbox:
        sid = sandbox.id
        for kwargs in (
            {"argv": ["x" * 300_000]},
            {"argv": ["echo", "a\0b"]},
            {"argv": []},
            {"argv": ["true"], "timeout": -1.0},
            {"argv": ["true"], "timeout": 1e9},
            {"argv": ["true"], "env": {"BAD NAME": "x"}},
            {"argv": ["true"], "workdir": "/tmp/../etc"},
        ):
            argv = kwargs.pop("argv")
            with pytest.raises(errors.InvalidArgument):
                operator.exec(sid, argv, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument):
            operator.exec(sid, ["cat"], stdin=b"x" * (33 << 20))
        # Above the message size the server accepts at all.
        with pytest.raises(errors.ResourceExhausted):
            operator.exec(sid, ["cat"], stdin=b"x" * (65 << 20))
        for limits in (
            requested_limits(memory_bytes=1 << 50),
            requested_limits(cpus=float("nan")),
            requested_limits(pids=-5),
            requested_limits(network=True),
        ):
            with pytest.raises((errors.InvalidArgument, errors.PermissionDenied)):
                operator.create_sandbox(SandboxRequest(profile="untrusted", limits=limits))
        # Bytes that are not a protobuf message at all.
        with grpc.insecure_channel(secure.unix) as channel:
            raw = channel.unary_stream("/sandbox.v1.SandboxService/Exec")
            with pytest.raises(grpc.RpcError) as info:
                list(raw(b"\xff\xff\xff\xff garbage", timeout=10))
            assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
        _, _, ok = run(operator, sid, "echo still here")
        assert verdict(ok) == "ok"
