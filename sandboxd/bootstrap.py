"""Make the offline base image: debootstrap a minimal Debian and import it into the engine.

No registry is assumed to be reachable, so the base image is built from a Debian mirror
with debootstrap and streamed into the engine as a tar archive. python3 is part of it so
that a sandbox never needs the network to run Python.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Protocol

from sandboxd.errors import BuildFailed, FailedPrecondition, InvalidArgument, SandboxError

log = logging.getLogger(__name__)

DEFAULT_TAG = "sandbox-base:bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SUITE = "bookworm"

SANDBOX_UID = 1000
SANDBOX_USER = "sandbox"
SANDBOX_HOME = "/sandbox/work"

LABELS = {"sandbox.managed": "1", "sandbox.role": "base"}
CHANGES = [
    'CMD ["python3"]',
    "ENV LANG=C.UTF-8",
    # `docker import` records no environment at all; spell out the usual PATH so that
    # every engine (and every derived build) sees the same one.
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
]

# Always installed, whatever the caller asks for: the worker needs python3 and file
# transfer into a sandbox needs tar.
REQUIRED_PACKAGES = ("python3", "tar")
REQUIRED_FILES = ("usr/bin/python3", "usr/bin/tar")

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

_SUITE_RE = re.compile(r"^[a-z][a-z0-9.-]*$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_MIRROR_RE = re.compile(r"^(https?|file)://\S+$")
_LOG_TAIL = 30

# Derived images stay small too: the same trimming the official slim Debian images do.
_DPKG_EXCLUDES = """\
# Keep images small: no docs, man pages or translations (copyright files stay).
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""
_APT_CLEAN = """\
# Keep images small: drop downloaded packages after every install.
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
"""

# What to drop after debootstrap: (directory, files to keep). Caches, package lists and
# documentation nobody reads inside a sandbox; copyright files stay for the licences.
_TRIM: tuple[tuple[str, Callable[[Path], bool]], ...] = (
    ("var/cache/apt", lambda p: False),
    ("var/lib/apt/lists", lambda p: p.name == "lock"),
    ("usr/share/doc", lambda p: p.name == "copyright"),
    ("usr/share/man", lambda p: False),
    ("usr/share/info", lambda p: False),
    ("usr/share/locale", lambda p: p.name == "locale.alias"),
)
# apt refuses to run without these.
_RECREATE = ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial")


class ImageImporter(Protocol):
    """The one engine call this module needs (satisfied by every engine)."""

    def import_image(
        self, fileobj: IO[bytes], tag: str, labels: dict[str, str], changes: list[str]
    ) -> str: ...


def make_base_image(
    engine: ImageImporter,
    tag: str = DEFAULT_TAG,
    mirror: str = DEFAULT_MIRROR,
    suite: str = DEFAULT_SUITE,
    include: Iterable[str] = ("python3",),
    on_log: Callable[[str], None] | None = None,
) -> str:
    """Debootstrap SUITE from MIRROR and import it as TAG; return the image id.

    Raises: InvalidArgument for a bad suite, mirror, tag or package name;
    FailedPrecondition when debootstrap, the archive keyring or root is missing;
    BuildFailed when debootstrap or tar fails (mirror unreachable included).
    """
    packages = _packages(include)
    _check_arguments(tag, mirror, suite)
    debootstrap = _find_debootstrap()
    if os.geteuid() != 0:
        raise FailedPrecondition(
            "making the base image needs root (debootstrap creates device nodes and chroots);"
            " run `sandboxd bootstrap-image` as root"
        )
    emit = _emitter(on_log)
    # /var/tmp rather than /tmp: it is disk-backed and rarely mounted noexec or nodev,
    # both of which break debootstrap's chroot.
    parent = os.environ.get("SANDBOX_BOOTSTRAP_TMPDIR") or (
        "/var/tmp" if os.path.isdir("/var/tmp") else None
    )
    root = Path(tempfile.mkdtemp(prefix="sandbox-base-", dir=parent))
    try:
        started = time.monotonic()
        _debootstrap(debootstrap, root, mirror, suite, packages, emit)
        _customize(root)
        emit(f"debootstrap took {time.monotonic() - started:.1f} s; importing as {tag}")
        started = time.monotonic()
        image_id = _import(engine, root, tag)
        emit(f"import took {time.monotonic() - started:.1f} s")
    finally:
        _remove_tree(root)
    emit(f"base image {tag} is {image_id}")
    return image_id


def _packages(include: Iterable[str]) -> list[str]:
    if isinstance(include, str):
        # A bare string would otherwise be split into single letters.
        include = include.split(",")
    wanted = [p.strip() for p in include if p.strip()]
    for name in wanted:
        if not _PACKAGE_RE.match(name):
            raise InvalidArgument(f"include: {name!r} is not a Debian package name")
    return list(dict.fromkeys([*REQUIRED_PACKAGES, *wanted]))


def _check_arguments(tag: str, mirror: str, suite: str) -> None:
    if not _SUITE_RE.match(suite):
        raise InvalidArgument(f"suite: {suite!r} is not a Debian suite name (e.g. bookworm)")
    if not _MIRROR_RE.match(mirror):
        raise InvalidArgument(
            f"mirror: {mirror!r} must be an http://, https:// or file:// URL"
            f" (e.g. {DEFAULT_MIRROR})"
        )
    if not tag or any(c.isspace() for c in tag):
        raise InvalidArgument(f"tag: {tag!r} is not an image reference")


def _find_debootstrap() -> str:
    path = shutil.which("debootstrap")
    if path is None:
        raise FailedPrecondition(
            "debootstrap is not installed: install debootstrap (apt-get install debootstrap)"
            " or run scripts/host-setup.sh"
        )
    if not KEYRING.is_file():
        # Without the keyring debootstrap would fall back to unverified downloads.
        raise FailedPrecondition(
            f"{KEYRING} is missing, so downloads cannot be verified:"
            " install it (apt-get install debian-archive-keyring gpgv)"
        )
    return path


def _emitter(on_log: Callable[[str], None] | None) -> Callable[[str], None]:
    def emit(line: str) -> None:
        log.debug("%s", line)
        if on_log is not None:
            on_log(line)

    return emit


def _debootstrap(
    debootstrap: str,
    root: Path,
    mirror: str,
    suite: str,
    packages: list[str],
    emit: Callable[[str], None],
) -> None:
    argv = [
        debootstrap,
        "--variant=minbase",
        f"--keyring={KEYRING}",
        f"--include={','.join(packages)}",
        suite,
        str(root),
        mirror,
    ]
    log.info("running %s", " ".join(argv))
    tail: deque[str] = deque(maxlen=_LOG_TAIL)
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    with subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip()
                tail.append(line)
                emit(line)
        except BaseException:
            # Do not leave debootstrap writing into a tree that is about to be removed.
            proc.kill()
            raise
        code = proc.wait()
    if code != 0:
        raise _debootstrap_error(code, list(tail), mirror, suite, root)
    missing = [f for f in REQUIRED_FILES if not (root / f).exists()]
    if missing:
        raise BuildFailed(f"debootstrap finished but {', '.join(missing)} is missing in the image")


def _debootstrap_error(
    code: int, tail: list[str], mirror: str, suite: str, root: Path
) -> SandboxError:
    text = "\n".join(tail)
    # The full log is inside the tree that is about to be removed; keep its end.
    detail = _read_tail(root / "debootstrap" / "debootstrap.log")
    if detail:
        text = f"{text}\n--- debootstrap.log ---\n{detail}"
    if "No such script" in text:
        return InvalidArgument(f"suite: debootstrap does not know {suite!r}\n{text}")
    if "Failed getting release file" in text or "Couldn't download" in text:
        return BuildFailed(
            f"cannot download {suite!r} from the Debian mirror {mirror}: check that the mirror"
            f" is reachable from this host (proxy settings included) and serves {suite},"
            f" or pass another one with --mirror\n{text}"
        )
    if "signature" in text.lower() or "gpgv" in text:
        return BuildFailed(
            f"the Release file of {mirror} {suite} could not be verified with {KEYRING};"
            f" update debian-archive-keyring\n{text}"
        )
    return BuildFailed(f"debootstrap exited with {code}\n{text}")


def _read_tail(path: Path, lines: int = 20) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(content[-lines:])


def _customize(root: Path) -> None:
    """Trim the tree and add the unprivileged sandbox user."""
    for rel, keep in _TRIM:
        _prune(root / rel, keep)
    for rel in _RECREATE:
        (root / rel).mkdir(parents=True, exist_ok=True)
    for path in (root / "var/cache/debconf").glob("*-old"):
        path.unlink()
    # Logs of the bootstrap itself say nothing about a sandbox; the files stay, empty,
    # so that their ownership and modes are what the packages set up.
    for path in (root / "var/log").rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.write_bytes(b"")
    # The engine provides these per container; the host's copies must not leak in.
    for rel in ("etc/resolv.conf", "etc/hostname"):
        (root / rel).unlink(missing_ok=True)
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/dpkg/dpkg.cfg.d/sandbox-nodoc").write_text(_DPKG_EXCLUDES)
    (root / "etc/apt/apt.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/apt.conf.d/sandbox-clean").write_text(_APT_CLEAN)
    _add_user(root)


def _prune(top: Path, keep: Callable[[Path], bool]) -> None:
    """Remove everything under TOP except the files KEEP accepts, and emptied directories."""
    if top.is_symlink() or not top.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            if not keep(here / name):
                (here / name).unlink()
        for name in dirnames:
            sub = here / name
            if sub.is_symlink():
                sub.unlink()
            elif not any(sub.iterdir()):
                sub.rmdir()


def _add_user(root: Path) -> None:
    uid = SANDBOX_UID
    passwd = f"{SANDBOX_USER}:x:{uid}:{uid}:sandbox:{SANDBOX_HOME}:/bin/sh"
    _set_entry(root / "etc/passwd", SANDBOX_USER, passwd, uid)
    _set_entry(root / "etc/group", SANDBOX_USER, f"{SANDBOX_USER}:x:{uid}:", uid)
    # Locked password: the account exists for file ownership, never for logins.
    _set_entry(root / "etc/shadow", SANDBOX_USER, f"{SANDBOX_USER}:!:19000:0:99999:7:::")
    home = root / SANDBOX_HOME.lstrip("/")
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home.parent, 0, 0)
    os.chmod(home.parent, 0o755)
    os.chown(home, uid, uid)
    os.chmod(home, 0o755)


def _set_entry(path: Path, name: str, entry: str, numeric_id: int | None = None) -> None:
    """Put ENTRY into a passwd-style file, replacing lines with the same name or id."""
    lines = path.read_text().splitlines() if path.exists() else []

    def clashes(line: str) -> bool:
        fields = line.split(":")
        if fields[0] == name:
            return True
        return numeric_id is not None and len(fields) > 2 and fields[2] == str(numeric_id)

    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    path.write_text("\n".join([*(line for line in lines if not clashes(line)), entry]) + "\n")
    os.chmod(path, mode)


def _import(engine: ImageImporter, root: Path, tag: str) -> str:
    # --numeric-owner: the image's uids must not be re-mapped through the host's names;
    # --one-file-system: never archive a file system debootstrap left mounted.
    argv = ["tar", "-C", str(root), "--numeric-owner", "--one-file-system", "-c", "."]
    with (
        tempfile.TemporaryFile() as errors,
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors
        ) as tar,
    ):
        assert tar.stdout is not None
        try:
            image_id = engine.import_image(tar.stdout, tag, dict(LABELS), list(CHANGES))
        except BaseException:
            tar.kill()
            raise
        code = tar.wait()
        if code != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace")[-2000:]
            raise BuildFailed(
                f"tar of the base tree failed with {code}; the image {tag} may be incomplete,"
                f" remove it (docker rmi {tag}) and retry\n{message}"
            )
    return image_id


def _remove_tree(root: Path) -> None:
    """Remove the debootstrap tree, first unmounting anything a failed run left mounted."""
    mounts = _mounts_under(root)
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
    still = _mounts_under(root)
    if still:
        # rmtree through a mounted /proc or /sys of the host would be a disaster.
        log.error("not removing %s: still mounted: %s", root, ", ".join(still))
        return
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        log.warning("could not remove %s completely", root)


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split()
        if len(fields) > 1:
            # /proc/self/mounts escapes spaces and such as octal.
            point = fields[1].encode().decode("unicode_escape")
            if point.startswith(prefix):
                points.append(point)
    return points
