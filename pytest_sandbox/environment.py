"""The host's installed distributions, read for mirroring into the sandbox.

Why copy installed files rather than build a wheelhouse: the files under
site-packages are exactly what the host's tests import (editable installs, local
patches and distributions that have no wheel included), copying needs neither a
network nor a compiler, and each distribution's RECORD says what it owns, so the
copy is complete and can be keyed by content. The image's Python must match the
host's major.minor for compiled files to load; the first build step checks that.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import os
import re
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.tags import sys_tags

ROOT = "/opt/pytest-sandbox"
SITE = f"{ROOT}/site"
PROJECT = f"{ROOT}/project"
# One build context travels in one message today; stay well under its limit.
LAYER_BYTES = 40 * 1024 * 1024
# A distribution this large gets layers of its own: it changes rarely and costs most.
OWN_LAYER_BYTES = 4 * 1024 * 1024
BUCKETS = 6
# Host-only: the sandbox plugin drives the session from the host; inside, the worker runs.
HOST_ONLY_PREFIXES = ("pytest_sandbox", "sandboxd")
COMPILED = (".so", ".pyd", ".dylib")

ContextFiles = dict[str, tuple[bytes, int]]


class EnvironmentProblem(Exception):
    """Something the tests import cannot be mirrored; the message says what to do."""


@dataclass(frozen=True)
class Layer:
    """One image layer of the environment: its files and their top-level names."""

    name: str
    files: ContextFiles

    def top_level(self) -> list[str]:
        names = {path.split("/", 2)[1] for path in self.files}
        return sorted(names)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def site_dirs() -> list[Path]:
    """The site directories on sys.path, in the order the host searches them."""
    candidates = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    known = {os.path.realpath(c) for c in candidates}
    out: list[Path] = []
    for entry in sys.path:
        real = os.path.realpath(entry or ".")
        if real in known and Path(real) not in out:
            out.append(Path(real))
    return out


def _host_only(dist: metadata.Distribution) -> bool:
    return any(
        ep.group == "pytest11" and ep.value.startswith(HOST_ONLY_PREFIXES)
        for ep in dist.entry_points
    )


def _compatible(dist: metadata.Distribution, name: str) -> None:
    """Raises: EnvironmentProblem if a compiled wheel was built for another interpreter."""
    text = dist.read_text("WHEEL") or ""
    tags = {line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")}
    compiled = any(str(f).endswith(COMPILED) for f in dist.files or [])
    if tags and compiled and not tags & {str(t) for t in sys_tags()}:
        raise EnvironmentProblem(
            f"{name} {dist.version} was built for {', '.join(sorted(tags))}, not for this "
            f"interpreter ({next(iter(sys_tags()))}): reinstall it for this Python "
            f"(pip install --force-reinstall {name}) or remove it from the environment"
        )


class Rewriter:
    """Points host paths in editable-install files at the copy of the project."""

    def __init__(self, rootdir: Path) -> None:
        roots = {str(rootdir.absolute()), os.path.realpath(rootdir)}
        self._roots = sorted(roots, key=len, reverse=True)

    def under_root(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in self._roots)

    def rewrite(self, data: bytes) -> bytes:
        text = data.decode("utf-8", "surrogateescape")
        for root in self._roots:
            text = text.replace(f"file://{root}", f"file://{PROJECT}").replace(root, PROJECT)
        return text.encode("utf-8", "surrogateescape")

    def outside(self, data: bytes, site_dir: Path) -> list[str]:
        """Existing absolute host paths the file names outside the rootdir and site dir."""
        text = data.decode("utf-8", "replace")
        found = re.findall(r"(?:file://)?(/[^\s'\"\],}]+)", text)
        return [
            p
            for p in found
            if not p.startswith(ROOT)
            and os.path.exists(p)
            and not self.under_root(p)
            and not os.path.realpath(p).startswith(str(site_dir))
        ]


def _is_path_file(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(".pth") or (name.startswith("__editable__") and name.endswith(".py"))


def _dist_files(
    dist: metadata.Distribution, name: str, site_dir: Path, rewriter: Rewriter
) -> Iterator[tuple[str, bytes, int]]:
    """(path under the site dir, content, mode) of what the distribution owns.

    Raises:
        EnvironmentProblem: no RECORD, or an install that points outside the rootdir.
    """
    if dist.files is None:
        raise EnvironmentProblem(
            f"{name} {dist.version} does not list its files (no RECORD): reinstall it with pip"
        )
    for rel in dist.files:
        posix = rel.as_posix()
        if not _mirrored(posix):
            continue  # console scripts and data outside the site dir, host bytecode
        path = Path(str(dist.locate_file(rel)))
        try:
            st = path.stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        data = path.read_bytes()
        if rel.name == "direct_url.json":
            data = rewriter.rewrite(data)
        elif _is_path_file(posix):
            data = rewriter.rewrite(data)
            stray = rewriter.outside(data, site_dir)
            if stray:
                raise EnvironmentProblem(
                    f"{name} {dist.version} is installed from {stray[0]}, outside the rootdir "
                    f"and any site directory: install it non-editable (pip install "
                    f"--no-editable {stray[0]}) or run pytest from a rootdir that contains it"
                )
        yield posix, data, 0o755 if st.st_mode & stat.S_IXUSR else 0o644


def _unowned_pth(
    site_dir: Path, owned: set[str], rewriter: Rewriter
) -> Iterator[tuple[str, bytes]]:
    """.pth files nobody's RECORD lists (written by hand or by an installer's hook).

    Raises:
        EnvironmentProblem: the file adds a directory outside the rootdir.
    """
    for path in sorted(site_dir.glob("*.pth")):
        if path.name in owned or not path.is_file():
            continue
        data = rewriter.rewrite(path.read_bytes())
        stray = rewriter.outside(data, site_dir)
        if stray:
            raise EnvironmentProblem(
                f"{path} adds {stray[0]}, outside the rootdir and any site directory: "
                "install what it holds into the environment, or remove the .pth file"
            )
        yield path.name, data


def distributions(rootdir: Path, dirs: list[Path] | None = None) -> dict[str, ContextFiles]:
    """Every distribution the host's pytest can import, by normalized name, as site files.

    The first of two distributions with one name on sys.path wins, as for the host.
    `dirs` defaults to the site directories on sys.path.

    Raises:
        EnvironmentProblem: a distribution cannot be mirrored (the message names it).
    """
    rewriter = Rewriter(rootdir)
    out: dict[str, ContextFiles] = {}
    taken: set[str] = set()
    for site_dir in site_dirs() if dirs is None else dirs:
        owned: set[str] = set()
        for dist in sorted(metadata.distributions(path=[str(site_dir)]), key=_sort_key):
            name = dist.metadata["Name"] or "?"
            key = _normalize(name)
            if key in out or _host_only(dist):
                owned.update(str(f) for f in dist.files or [])
                continue
            _compatible(dist, name)
            files: ContextFiles = {}
            for rel, data, mode in _dist_files(dist, name, site_dir, rewriter):
                owned.add(rel)
                if rel not in taken:
                    taken.add(rel)
                    files[rel] = (data, mode)
            out[key] = files
        extra = {rel: (data, 0o644) for rel, data in _unowned_pth(site_dir, owned, rewriter)}
        extra = {rel: v for rel, v in extra.items() if rel not in taken}
        if extra:
            taken.update(extra)
            out.setdefault(f"~site-{len(out)}", {}).update(extra)
    return out


def fingerprint(rootdir: Path, dirs: list[Path] | None = None) -> str:
    """A digest of what `distributions` reads, from file metadata alone (no contents).

    Equal fingerprints mean equal mirrored environments (same files, sizes and times,
    same rootdir, same Python and mirroring code), so a session can reuse the image
    chain a previous one built without reading hundreds of megabytes again.
    """
    digest = hashlib.sha256(f"{sys.version_info[:3]}|{rootdir.resolve()}".encode())
    for source in (Path(__file__), Path(__file__).with_name("snapshot.py")):
        digest.update(source.read_bytes())
    for site_dir in site_dirs() if dirs is None else dirs:
        digest.update(f"\0site {site_dir}".encode())
        found = metadata.distributions(path=[str(site_dir)])
        paths: list[str] = []
        for dist in sorted(found, key=lambda d: str(d.locate_file(""))):
            base = str(dist.locate_file(""))
            record = dist.read_text("RECORD")
            if record is None:  # no RECORD to list its files by: never reuse
                digest.update(os.urandom(16))
                continue
            digest.update(f"\0dist {base}\0{record}".encode())
            for line in record.splitlines():
                rel = line.split(",", 1)[0]
                if _mirrored(rel):  # what is not mirrored cannot change the images
                    paths.append(rel if rel.startswith("/") else f"{base}/{rel}")
        paths.extend(str(path) for path in sorted(site_dir.glob("*.pth")))
        digest.update(_stat_lines(paths))
    return digest.hexdigest()


def _mirrored(rel: str) -> bool:
    """Whether `_dist_files` would take a RECORD path (bytecode and files outside the
    site directory stay behind)."""
    return not (rel.startswith("..") or "__pycache__" in rel or rel.endswith((".pyc", ".pyo")))


def _stat_lines(paths: list[str]) -> bytes:
    """Each path with its mode, size and modification time, one stat each (the loop is
    kept tight: a session runs it over every mirrored file, ~7,000 in a dev venv)."""
    stat = os.stat
    lines = []
    for path in paths:
        try:
            st = stat(path)
        except OSError:
            lines.append(f"{path} -")
            continue
        lines.append(f"{path} {st.st_mode} {st.st_size} {st.st_mtime_ns}")
    return "\0".join(lines).encode()


def _sort_key(dist: metadata.Distribution) -> str:
    return _normalize(dist.metadata["Name"] or "")


def layers(dists: dict[str, ContextFiles], prefix: str = "site") -> list[Layer]:
    """Group distributions into image layers so a change to one rebuilds little.

    Large distributions come first, each in its own layers; small ones share a few
    buckets chosen by a hash of their name, so adding or upgrading one touches one
    bucket and the layers after it.
    """
    big: list[Layer] = []
    buckets: list[list[tuple[str, bytes, int]]] = [[] for _ in range(BUCKETS)]
    for key in sorted(dists):
        files = dists[key]
        size = sum(len(data) for data, _ in files.values())
        items = [(rel, data, mode) for rel, (data, mode) in sorted(files.items())]
        if size >= OWN_LAYER_BYTES:
            big.extend(_split(key, items, prefix))
        else:
            index = int(hashlib.sha256(key.encode()).hexdigest(), 16) % BUCKETS
            buckets[index].extend(items)
    small = [
        layer
        for i, items in enumerate(buckets)
        if items
        for layer in _split(f"~{i}", items, prefix)
    ]
    return big + small


def _split(name: str, items: Iterable[tuple[str, bytes, int]], prefix: str) -> list[Layer]:
    """`items` cut into layers of at most LAYER_BYTES (a bigger single file stays whole)."""
    out: list[Layer] = []
    files: ContextFiles = {}
    size = 0
    for rel, data, mode in items:
        if files and size + len(data) > LAYER_BYTES:
            out.append(Layer(f"{name}.{len(out)}", files))
            files, size = {}, 0
        files[f"{prefix}/{rel}"] = (data, mode)
        size += len(data)
    if files:
        out.append(Layer(f"{name}.{len(out)}", files))
    return out


def outside_imports(rootdir: Path) -> list[tuple[str, str]]:
    """(module, file) of imported modules that live outside the stdlib, site dirs and rootdir.

    These are what a routed test could not import inside the sandbox.
    """
    paths = sysconfig.get_paths()
    inside = [os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")]
    inside += [str(d) for d in site_dirs()] + [os.path.realpath(rootdir)]
    found: dict[str, str] = {}
    # Resolved once per directory (a session has hundreds of modules in a few dozen).
    directories: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        file = getattr(module, "__file__", None)
        if not file or top in found or top.startswith(HOST_ONLY_PREFIXES):
            continue
        if os.path.islink(file):
            real = os.path.realpath(file)
        else:
            head, tail = os.path.split(file)
            if head not in directories:
                directories[head] = os.path.realpath(head)
            real = os.path.join(directories[head], tail)
        if not any(real == d or real.startswith(d.rstrip("/") + "/") for d in inside):
            found[top] = real
    return sorted(found.items())


def check_imports(rootdir: Path) -> None:
    """Raises: EnvironmentProblem naming what was imported from outside what is mirrored."""
    outside = outside_imports(rootdir)
    if outside:
        name, file = outside[0]
        more = f" (and {', '.join(n for n, _ in outside[1:])})" if outside[1:] else ""
        raise EnvironmentProblem(
            f"{name} is imported from {file}{more}, outside any site directory and the "
            f"rootdir {rootdir}, so the sandbox cannot have it: install it into the "
            "environment (pip install ...) or move it under the rootdir"
        )


def requirements_site(rootdir: Path, requirements: str, cache: Path | None = None) -> Path:
    """A site directory holding `requirements` (and pytest at the host's version).

    For ini `sandbox_requirements`: the image's environment is the file's, not the
    host's. pip runs on the host, with the host's index settings and certificates;
    only the installed files reach the image, never those settings. The result is
    cached by the file's content, the pinned pytest and the interpreter's tags.

    Raises:
        EnvironmentProblem: the file is missing or pip could not install it.
    """
    path = rootdir / requirements
    if not path.is_file():
        raise EnvironmentProblem(f"sandbox_requirements = {requirements}: no such file")
    pin = f"pytest=={metadata.version('pytest')}"
    key = hashlib.sha256(
        b"\0".join([path.read_bytes(), pin.encode(), str(next(iter(sys_tags()))).encode()])
    )
    base = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = base / "pytest-sandbox" / "requirements" / key.hexdigest()[:32]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    argv += ["--no-warn-script-location", "--target", str(work), "-r", str(path), pin]
    done = subprocess.run(argv, cwd=path.parent, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        tail = " ".join(done.stderr.strip().splitlines()[-3:])
        raise EnvironmentProblem(
            f"sandbox_requirements = {requirements}: pip could not install it "
            f"(exit {done.returncode}): {tail}; fix the file or the host's pip settings, "
            "or remove the key to mirror the host's environment instead"
        )
    try:
        work.rename(target)
    except OSError:  # another session finished the same install first
        shutil.rmtree(work, ignore_errors=True)
    return target
