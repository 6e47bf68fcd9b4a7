from __future__ import annotations

import io
import tarfile

import pytest

from sandboxd.errors import InvalidArgument
from sandboxd.paths import check_relative, check_sandbox_path, check_tar

WRITABLE = ("/sandbox/work", "/tmp")


@pytest.mark.parametrize(
    ("path", "norm"), [("a/b", "a/b"), ("./a//b/", "a/b"), ("a/./b", "a/b"), ("x", "x")]
)
def test_check_relative_normalizes(path: str, norm: str) -> None:
    assert check_relative(path, field="f") == norm


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "not a usable path"),
        ("a\x00b", "not a usable path"),
        ("x" * 5000, "not a usable path"),
        ("/etc/passwd", "must be relative"),
        ("..", "climbs out"),
        ("../x", "climbs out"),
        ("a/../../x", "climbs out"),
        ("a/../b", "climbs out"),
    ],
)
def test_check_relative_refuses(path: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"context.path: .*{why}"):
        check_relative(path, field="context.path")


@pytest.mark.parametrize(
    ("path", "full"),
    [
        ("", "/sandbox/work"),
        ("out", "/sandbox/work/out"),
        ("a/b/", "/sandbox/work/a/b"),
        ("/tmp", "/tmp"),
        ("/tmp/x/y", "/tmp/x/y"),
        ("/sandbox/work/sub", "/sandbox/work/sub"),
    ],
)
def test_sandbox_path_inside_writable_dirs(path: str, full: str) -> None:
    assert check_sandbox_path(path, workdir="/sandbox/work", writable=WRITABLE) == full


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("../etc", "must not contain '..'"),
        ("/tmp/../etc/passwd", "must not contain '..'"),
        ("/etc", "outside the sandbox's writable dirs"),
        ("/", "outside the sandbox's writable dirs"),
        ("/tmpfoo", "outside the sandbox's writable dirs"),
        ("/sandbox", "outside the sandbox's writable dirs"),
        ("/sandbox/workx/a", "outside the sandbox's writable dirs"),
        ("a\x00", "not a usable path"),
    ],
)
def test_sandbox_path_refuses_escapes(path: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"path: .*{why}"):
        check_sandbox_path(path, workdir="/sandbox/work", writable=WRITABLE)


def _tar(*members: tarfile.TarInfo, content: bytes = b"hello") -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            if m.isfile():
                m.size = len(content)
                tar.addfile(m, io.BytesIO(content))
            else:
                tar.addfile(m)
    buf.seek(0)
    return buf


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def test_check_tar_counts_files_and_bytes() -> None:
    buf = _tar(
        _member("dir", tarfile.DIRTYPE),
        _member("dir/a.txt"),
        _member("b.txt"),
        _member("dir/link", tarfile.SYMTYPE, "a.txt"),
        _member("up", tarfile.SYMTYPE, "dir/../b.txt"),
    )
    assert check_tar(buf) == (2, 10)


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_member("/etc/passwd"), "must be relative"),
        (_member("../evil"), "climbs out"),
        (_member("a/../../evil"), "climbs out"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "absolute link target"),
        (_member("d/link", tarfile.SYMTYPE, "../../etc"), "points outside the archive"),
        (_member("hard", tarfile.LNKTYPE, "../x"), "points outside the archive"),
        (_member("dev", tarfile.CHRTYPE), "only files, dirs and links"),
        (_member("fifo", tarfile.FIFOTYPE), "only files, dirs and links"),
    ],
)
def test_check_tar_refuses_escaping_members(member: tarfile.TarInfo, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        check_tar(_tar(member))


def test_check_tar_refuses_garbage() -> None:
    with pytest.raises(InvalidArgument, match=r"not a readable tar archive"):
        check_tar(io.BytesIO(b"this is not a tar archive" * 40))


def test_check_tar_bounds_member_count() -> None:
    buf = _tar(*(_member(f"f{i}") for i in range(5)))
    with pytest.raises(InvalidArgument, match=r"more than 3 members"):
        check_tar(buf, max_members=3)
