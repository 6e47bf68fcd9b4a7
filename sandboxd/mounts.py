"""Host directory mounts: which ones a request may have, decided by the server's config alone.

A mount is allowed only below a directory the operator listed (`mount_roots`, and
`writable_mount_roots` for read-write), after following symlinks, so a link inside an
allowed tree cannot lead out of it. Paths are checked on the machine sandboxd runs on,
which must be the engine's host. A path with ".." is refused outright rather than
normalised: a client that sends one is confused or probing.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from pathlib import Path

from sandboxd.api import Mount
from sandboxd.config import Profile, ServerConfig
from sandboxd.engine.base import BindMount
from sandboxd.errors import FailedPrecondition, InvalidArgument, PermissionDenied

MAX_MOUNTS = 16
MAX_PATH = 4096
#: Targets that would hide what the container needs to work (or expose what it must not).
RESERVED_TARGETS = ("/proc", "/sys", "/dev")


def check_mounts(
    mounts: Sequence[Mount], profile: Profile, config: ServerConfig, scratch: Sequence[str]
) -> tuple[BindMount, ...]:
    """The bind mounts `mounts` become, each checked against the server's policy.

    Raises:
        InvalidArgument: a path that is not absolute, has "..", is not a directory, or a
            target that is reserved, a scratch directory, or used twice.
        PermissionDenied: the profile allows no mounts, or a source lies outside the
            server's roots (or outside its writable roots for a writable mount).
        FailedPrecondition: the server runs sandboxes on a cluster's nodes.
    """
    if not mounts:
        return ()
    if not profile.allow_mounts:
        raise PermissionDenied(
            f"spec.mounts: profile {profile.name!r} does not allow host mounts "
            "(the server's config can allow them: allow_mounts in its [[profiles]] table)"
        )
    if config.engine == "cluster":
        raise FailedPrecondition(
            "spec.mounts: host mounts are not available on a cluster: the sandbox runs on "
            "another machine than the one the server could check the path on (send the "
            "files with PutFiles instead)"
        )
    if len(mounts) > MAX_MOUNTS:
        raise InvalidArgument(f"spec.mounts: {len(mounts)} is above the limit of {MAX_MOUNTS}")
    binds: list[BindMount] = []
    for index, mount in enumerate(mounts):
        where = f"spec.mounts[{index}]"
        source = _absolute(mount.source, f"{where}.source")
        target = _absolute(mount.target or mount.source, f"{where}.target")
        _check_target(target, f"{where}.target", scratch, {b.target for b in binds})
        real = _allowed(source, mount.writable, config, f"{where}.source")
        binds.append(BindMount(source=real, target=target, read_only=not mount.writable))
    return tuple(binds)


def _absolute(path: str, field: str) -> str:
    """Raises: InvalidArgument: not absolute, with "..", a NUL byte, or too long."""
    if not path.startswith("/") or "\x00" in path or len(path) > MAX_PATH:
        raise InvalidArgument(f"{field}: {path[:80]!r} is not an absolute path", field=field)
    if ".." in path.split("/"):
        raise InvalidArgument(f"{field}: {path[:80]!r} has '..'; give the path itself", field=field)
    if ":" in path or "," in path:
        # The engines' mount syntax separates with these; such a path would be misread.
        raise InvalidArgument(f"{field}: {path[:80]!r} has ':' or ','", field=field)
    return posixpath.normpath(path)


def _check_target(target: str, field: str, scratch: Sequence[str], taken: set[str]) -> None:
    """Raises: InvalidArgument: a reserved or scratch target, or one already used."""
    if target == "/" or any(_below(target, r) for r in RESERVED_TARGETS):
        raise InvalidArgument(f"{field}: {target} is reserved inside the sandbox", field=field)
    if target in scratch:
        raise InvalidArgument(
            f"{field}: {target} is the sandbox's writable scratch; mount below it instead",
            field=field,
        )
    if target in taken:
        raise InvalidArgument(f"{field}: {target} is the target of another mount", field=field)


def _allowed(source: str, writable: bool, config: ServerConfig, field: str) -> str:
    """The resolved source, if the config allows mounting it (and writing, when asked).

    Raises:
        PermissionDenied: outside every root, or writable outside the writable roots.
        InvalidArgument: allowed, but not an existing directory.
    """
    roots = _resolved(config.mount_roots + config.writable_mount_roots)
    if not roots:
        raise PermissionDenied(
            f"{field}: {source} refused: this server allows no host mounts "
            "(its config lists no mount_roots)"
        )
    real = os.path.realpath(source)
    if not any(_below(real, root) for root in roots):
        via = "" if real == source else " (after following symlinks)"
        raise PermissionDenied(
            f"{field}: {source} is not below a directory this server allows mounting{via}"
        )
    if writable and not any(_below(real, r) for r in _resolved(config.writable_mount_roots)):
        raise PermissionDenied(
            f"{field}: {source} may only be mounted read-only on this server "
            "(it is not below one of its writable_mount_roots)"
        )
    if not os.path.isdir(real):
        raise InvalidArgument(f"{field}: {source} is not a directory on the server", field=field)
    return real


def _resolved(roots: Sequence[Path]) -> list[str]:
    return [os.path.realpath(r) for r in roots]


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
