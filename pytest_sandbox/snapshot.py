"""What reaches the sandbox once per session: the environment, the project and the worker.

All of it goes into images as build context, so the images are content-addressed
by it: a rerun without changes is a cache hit on the service.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import stat
import subprocess
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pytest_sandbox import environment
from pytest_sandbox.environment import PROJECT, ROOT, SITE, EnvironmentProblem, Layer

log = logging.getLogger(__name__)

__all__ = ["PROJECT", "EnvironmentProblem", "Snapshot", "SnapshotTooLarge", "take"]

LIB = f"{ROOT}/lib"
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
    """The project is too large for one build context."""


def _walk(root: Path) -> Iterator[Path]:
    listed = _git_listed(root)
    if listed is None:
        yield from _walk_tree(root)
        return
    for path in listed:
        rel = path.relative_to(root).parts
        if any(part in SKIP_DIRS or part.endswith(SKIP_SUFFIXES) for part in rel):
            continue
        if path.is_dir() and not path.is_symlink():
            yield from _walk_tree(path)  # a submodule: git lists only its directory
        else:
            yield path


def _git_listed(root: Path) -> list[Path] | None:
    """The files git would list under `root` (tracked, plus untracked ones not ignored),
    or None when `root` is not in a git work tree or git is missing.

    Following the project's .gitignore keeps a stray report or log from changing the
    image key and forcing a build; git itself does the matching, so nested .gitignore
    files, negations and .git/info/exclude mean what they mean to git.
    """
    try:
        listing = ["ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        out = subprocess.run(
            ["git", "-C", str(root), *listing],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    names = sorted({os.fsdecode(n) for n in out.stdout.split(b"\0") if n})
    return [root / name for name in names]


def _walk_tree(root: Path) -> Iterator[Path]:
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
    """Regular files under `root` minus VCS data, venvs, caches, build output and `exclude`;
    in a git work tree only those git lists (tracked, or untracked and not ignored).

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


def worker_files(prefix: str = "lib") -> ContextFiles:
    """The worker, its fork-reset and its debugger (all stand-alone); pytest and everything
    else come with the mirrored environment."""
    files: ContextFiles = {}
    for name in ("worker", "pristine", "debugger"):
        source = Path(__file__).with_name(f"{name}.py")
        files[f"{prefix}/pytest_sandbox_{name}.py"] = (source.read_bytes(), 0o644)
    return files


# Placed in the image's own site directory, so every python3 in the sandbox (the
# worker, and any interpreter a test starts) sees the mirrored site directory with
# its .pth files processed, ahead of the image's own site packages as on the host.
SITE_PTH = (
    f"import site, sys; n = len(sys.path); site.addsitedir({SITE!r}); new = sys.path[n:]; "
    "del sys.path[n:]; i = next((k for k, p in enumerate(sys.path) if p.endswith('-packages')), "
    "len(sys.path)); sys.path[i:i] = new\n"
)
MISMATCH = "pytest-sandbox: python-mismatch"
# pytest rewrites the asserts of its plugins' distributions as it imports them, and a
# sandbox (PYTHONDONTWRITEBYTECODE) cannot cache the result: loading the plugins once at
# build time leaves the rewritten bytecode in the image, so no worker redoes it (about
# 1 s at every worker start with hypothesis installed). Nothing to collect in /tmp: exit 5.
REWRITE_CACHE_LINE = (
    "RUN cd /tmp && python3 -m pytest --collect-only -q -p no:cacheprovider >/dev/null 2>&1 || true"
)


def interpreter_problem(build_error: str, image: str) -> str | None:
    """The one message for a base image whose python3 is not the host's major.minor."""
    match = re.search(rf"{MISMATCH} image=(\S+) host=(\S+)", build_error)
    if match is None:
        return None
    found, host = match.groups()
    found = "no python3" if found == "none" else f"Python {found}"
    return (
        f"the image {image or '(the service default)'} has {found}, but this pytest runs on "
        f"Python {host}; routed tests need the same major.minor (compiled packages and "
        f"bytecode depend on it). Fix: use an image whose python3 is {host} (ini "
        f"sandbox_image = python:{host}-slim, or sandbox_dockerfile installing python{host}), "
        f"or run pytest with a Python {found.split()[-1]} environment"
    )


def _stage_zero(user_fragment: str, python: str) -> str:
    lines = [user_fragment.strip()] if user_fragment.strip() else []
    # The check runs once per base image and fragment (its layer is cached): a wrong
    # python3 then stops the session with one message instead of failing every import.
    # The marker is split in the command so that the build log's echo of the step
    # does not match it; only the check's output does.
    head, tail = MISMATCH.split("-mismatch")
    check = (
        f"import sys; v = '%d.%d' % sys.version_info[:2]; sys.exit(0 if v == '{python}' "
        f"else '{head}-' 'mismatch{tail} image=' + v + ' host={python}')"
    )
    lines += [
        f"RUN command -v python3 >/dev/null || {{ echo '{head}-''mismatch{tail} image=none "
        f'host={python}\'; exit 1; }}; python3 -c "{check}"',
        f"COPY pth {ROOT}/pth",
        'RUN d=$(python3 -c "import site; print(site.getsitepackages()[0])") && mkdir -p "$d" '
        f'&& cp {ROOT}/pth/pytest-sandbox.pth "$d/" && mkdir -p {SITE}',
    ]
    return "\n".join(lines) + "\n"


def _compile_line(paths: list[str]) -> str:
    return (
        "RUN python3 -m compileall -q -j0 " + " ".join(shlex.quote(p) for p in paths) + " || true"
    )


@dataclass(frozen=True)
class Snapshot:
    """The build contexts and the Dockerfile lines that place them in the image.

    The environment is a chain of images of its own (one per layer), each keyed by
    its content, so it is built once and shared by every run and project with the
    same environment; the worker and the project go in one image above it.
    """

    context: ContextFiles
    has_src: bool
    layers: tuple[Layer, ...] = ()
    python: str = f"{sys.version_info[0]}.{sys.version_info[1]}"
    #: Set when the layers are not read yet: equal fingerprints, equal environments.
    env_fingerprint: str = ""
    #: (rootdir, site dirs or None for sys.path's) to read the layers from.
    env_source: tuple[Path, tuple[Path, ...] | None] | None = None

    def with_environment(self) -> Snapshot:
        """This snapshot with its environment's layers read.

        Raises:
            EnvironmentProblem: a distribution cannot be mirrored (see environment).
        """
        if self.layers or self.env_source is None:
            return self
        rootdir, dirs = self.env_source
        env = environment.distributions(rootdir, list(dirs) if dirs is not None else None)
        return replace(self, layers=tuple(environment.layers(env)), env_fingerprint="")

    def environment(self, user_fragment: str) -> list[tuple[str, ContextFiles]]:
        """(fragment, context) of each environment image, to build in order."""
        pth = {"pth/pytest-sandbox.pth": (SITE_PTH.encode(), 0o644)}
        stages = [(_stage_zero(user_fragment, self.python), pth)]
        for layer in self.layers:
            tops = [f"{SITE}/{name}" for name in layer.top_level()]
            compiled = [p for p in tops if "." not in p.rsplit("/", 1)[1] or p.endswith(".py")]
            fragment = f"COPY site {SITE}\n" + (_compile_line(compiled) + "\n" if compiled else "")
            stages.append((fragment, layer.files))
        if self.layers:  # the last layer: every plugin and its distribution is in place
            fragment, files = stages[-1]
            stages[-1] = (fragment + REWRITE_CACHE_LINE + "\n", files)
        return stages

    def fragment(self) -> str:
        """The project's image, on top of the environment."""
        # The worker changes only with the plugin, the project every edit: separate
        # layers keep a project change from recompiling the worker.
        lines = [
            f"COPY lib {LIB}",
            _compile_line([LIB]),
            f"COPY project {PROJECT}",
            _compile_line([PROJECT]),
        ]
        return "\n".join(lines) + "\n"

    def pythonpath(self) -> str:
        paths = [LIB] + ([f"{PROJECT}/src"] if self.has_src else []) + [PROJECT]
        return ":".join(paths)


def take(
    rootdir: Path, exclude: Collection[Path] = (), requirements: str = "", *, lazy: bool = False
) -> Snapshot:
    """Read the project and the worker's deps once for the session.

    `exclude` names files the session itself writes (a --junitxml report): taking them
    would change the image, and force a build, on every run. `requirements` (ini
    sandbox_requirements) replaces the host's environment with that file's. With `lazy`,
    the environment is only fingerprinted; `with_environment` reads it when needed.

    Raises:
        SnapshotTooLarge: see project_files.
        EnvironmentProblem: a distribution cannot be mirrored (see environment).
    """
    site_dirs = [environment.requirements_site(rootdir, requirements)] if requirements else None
    context = worker_files()
    context.update(project_files(rootdir, exclude=exclude))
    snap = Snapshot(
        context=context,
        has_src=(rootdir / "src").is_dir(),
        env_source=(rootdir, tuple(site_dirs) if site_dirs is not None else None),
    )
    if lazy:
        return replace(snap, env_fingerprint=environment.fingerprint(rootdir, site_dirs))
    return snap.with_environment()


def sandbox_path(host_path: Path, rootdir: Path) -> str | None:
    """Where a host path under the rootdir lives inside the sandbox."""
    try:
        rel = host_path.resolve().relative_to(rootdir.resolve())
    except ValueError:
        return None
    return PROJECT if rel == Path(".") else f"{PROJECT}/{rel.as_posix()}"
