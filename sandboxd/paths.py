"""Path and tar-member checks that keep file transfers inside the sandbox."""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterable
from typing import IO

from sandboxd.errors import InvalidArgument

MAX_PATH = 4096


def check_relative(path: str, *, field: str) -> str:
    """A normalized relative POSIX path that stays below its root.

    Raises:
        InvalidArgument: empty, absolute, NUL bytes, or climbing out with "..".
    """
    if not path or "\x00" in path or len(path) > MAX_PATH:
        raise InvalidArgument(f"{field}: {path[:80]!r} is not a usable path")
    if path.startswith("/"):
        raise InvalidArgument(f"{field}: {path[:80]!r} must be relative")
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../") or "/../" in f"/{path}/":
        raise InvalidArgument(f"{field}: {path[:80]!r} climbs out of its root with '..'")
    return norm


def check_sandbox_path(
    path: str, *, workdir: str, writable: Iterable[str], field: str = "path"
) -> str:
    """An absolute path inside one of the sandbox's writable dirs.

    Relative paths are taken from the work dir.

    Raises:
        InvalidArgument: NUL bytes, "..", or a path outside the writable dirs.
    """
    if not path:
        return workdir
    if "\x00" in path or len(path) > MAX_PATH:
        raise InvalidArgument(f"{field}: not a usable path")
    if ".." in path.split("/"):
        raise InvalidArgument(f"{field}: {path[:80]!r} must not contain '..'")
    full = posixpath.normpath(path if path.startswith("/") else posixpath.join(workdir, path))
    roots = list(writable)
    if not any(full == root or full.startswith(root.rstrip("/") + "/") for root in roots):
        raise InvalidArgument(
            f"{field}: {full[:80]!r} is outside the sandbox's writable dirs ({', '.join(roots)})"
        )
    return full


def check_tar(fileobj: IO[bytes], *, max_members: int = 100_000) -> tuple[int, int]:
    """Validate every member of a tar stream; return (files, bytes).

    Only regular files, dirs, and links that stay inside the archive's root pass.

    Raises:
        InvalidArgument: not a tar, absolute or ".." names, devices, escaping links.
    """
    files = size = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
            for count, member in enumerate(tar, 1):
                if count > max_members:
                    raise InvalidArgument(f"tar: more than {max_members} members")
                name = check_relative(
                    member.name.rstrip("/") or ".", field=f"tar member {member.name[:80]!r}"
                )
                if member.isfile():
                    files += 1
                    size += member.size
                elif member.isdir():
                    pass
                elif member.issym() or member.islnk():
                    target = member.linkname
                    if member.issym():
                        joined = posixpath.join(posixpath.dirname(name), target)
                    else:
                        joined = target
                    if target.startswith("/"):
                        raise InvalidArgument(
                            f"tar member {member.name[:80]!r}: absolute link target {target[:80]!r}"
                        )
                    norm = posixpath.normpath(joined)
                    if norm == ".." or norm.startswith("../"):
                        raise InvalidArgument(
                            f"tar member {member.name[:80]!r}: link target {target[:80]!r} "
                            "points outside the archive"
                        )
                else:
                    raise InvalidArgument(
                        f"tar member {member.name[:80]!r}: only files, dirs and links are allowed"
                    )
    except tarfile.TarError as exc:
        raise InvalidArgument(f"tar: not a readable tar archive ({exc})") from None
    return files, size
