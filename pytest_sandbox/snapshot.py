"""What reaches the sandbox once per session: the project's files, the worker and its deps.

Both go into the image as build context, so the image is content-addressed by
them: a rerun without changes is a cache hit on the service.
"""

from __future__ import annotations

import importlib.metadata as metadata
import logging
import os
import stat
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

log = logging.getLogger(__name__)

ROOT = "/opt/pytest-sandbox"
LIB = f"{ROOT}/lib"
PROJECT = f"{ROOT}/project"
WORKER = f"{LIB}/pytest_sandbox_worker.py"

# Directories that are never part of a project's snapshot: VCS data, virtualenvs,
# caches and build output. Anything holding a pyvenv.cfg is a virtualenv too.
SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        "__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".hypothesis",
        ".eggs",
        "build",
        "dist",
        "node_modules",
        "htmlcov",
    }
)
SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")
MAX_SNAPSHOT_BYTES = 1024**3  # context travels as chunked blobs; this bounds host memory

ContextFiles = dict[str, tuple[bytes, int]]


class SnapshotTooLarge(Exception):
    pass


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in SKIP_DIRS
            and not d.endswith(SKIP_SUFFIXES)
            and not (base / d / "pyvenv.cfg").exists()
        )
        for name in sorted(filenames):
            if not name.endswith(SKIP_SUFFIXES):
                yield base / name


def _mode(st: os.stat_result) -> int:
    return 0o755 if st.st_mode & stat.S_IXUSR else 0o644


def project_files(
    root: Path, prefix: str = "project", exclude: Collection[Path] = ()
) -> ContextFiles:
    """Regular files under `root` minus VCS data, venvs, caches, build output and `exclude`.

    Raises:
        SnapshotTooLarge: the files add up to more than one build context can carry.
    """
    files: ContextFiles = {}
    total = 0
    skip = {p.resolve() for p in exclude}
    for path in _walk(root):
        if skip and path.resolve() in skip:
            continue
        try:
            st = path.stat()
        except OSError:
            continue  # a dangling symlink or a file removed while we walk
        if not stat.S_ISREG(st.st_mode):
            continue
        total += st.st_size
        if total > MAX_SNAPSHOT_BYTES:
            raise SnapshotTooLarge(
                f"the project under {root} is larger than {MAX_SNAPSHOT_BYTES >> 20} MiB; "
                "move data out of the rootdir or run from a smaller rootdir"
            )
        files[f"{prefix}/{path.relative_to(root).as_posix()}"] = (path.read_bytes(), _mode(st))
    return files


def _requirements(name: str) -> list[str]:
    """Names of the installed distribution's runtime deps that apply to this interpreter."""
    out = []
    for text in metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        out.append(req.name)
    return out


def _closure(root: str) -> list[metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            log.debug("dependency %s is not installed; skipped", name)
            continue
        seen[key] = dist
        todo.extend(_requirements(name))
    return list(seen.values())


def lib_files(prefix: str = "lib") -> ContextFiles:
    """pytest and its pure-Python deps, at the host's versions, plus the worker.

    Raises:
        RuntimeError: a dependency ships compiled code, which cannot be copied across.
    """
    files: ContextFiles = {}
    for dist in _closure("pytest"):
        for rel in dist.files or []:
            parts = rel.parts
            if not parts or parts[0] == ".." or "__pycache__" in parts:
                continue  # console scripts live outside site-packages
            if rel.suffix in (".so", ".pyd", ".dylib"):
                raise RuntimeError(
                    f"{dist.metadata['Name']} ships compiled code ({rel}); "
                    "it cannot be copied into the sandbox"
                )
            path = Path(str(dist.locate_file(rel)))
            if path.is_file() and rel.suffix not in (".pyc", ".pyo"):
                files[f"{prefix}/{rel.as_posix()}"] = (path.read_bytes(), 0o644)
    worker = Path(__file__).with_name("worker.py")
    files[f"{prefix}/pytest_sandbox_worker.py"] = (worker.read_bytes(), 0o644)
    return files


@dataclass(frozen=True)
class Snapshot:
    """The build context and the Dockerfile lines that place it in the image."""

    context: ContextFiles
    has_src: bool

    def fragment(self, user_fragment: str) -> str:
        # The user's lines come first so their (slow) layers stay cached in the
        # engine when only the project's files change.
        lines = [user_fragment.strip()] if user_fragment.strip() else []
        # The worker's libs change only with the host's pytest, the project every edit:
        # separate layers keep a project change from recompiling pytest.
        lines += [
            f"COPY lib {LIB}",
            f"RUN python3 -m compileall -q {LIB} || true",
            f"COPY project {PROJECT}",
            f"RUN python3 -m compileall -q {PROJECT} || true",
        ]
        return "\n".join(lines) + "\n"

    def pythonpath(self) -> str:
        paths = [LIB] + ([f"{PROJECT}/src"] if self.has_src else []) + [PROJECT]
        return ":".join(paths)


def take(rootdir: Path, exclude: Collection[Path] = ()) -> Snapshot:
    """Read the project and the worker's deps once for the session.

    `exclude` names files the session itself writes (a --junitxml report): taking them
    would change the image, and force a build, on every run.

    Raises:
        SnapshotTooLarge: see project_files.
    """
    context = lib_files()
    context.update(project_files(rootdir, exclude=exclude))
    return Snapshot(context=context, has_src=(rootdir / "src").is_dir())


def sandbox_path(host_path: Path, rootdir: Path) -> str | None:
    """Where a host path under the rootdir lives inside the sandbox."""
    try:
        rel = host_path.resolve().relative_to(rootdir.resolve())
    except ValueError:
        return None
    return PROJECT if rel == Path(".") else f"{PROJECT}/{rel.as_posix()}"
