"""The grading image: the course's toolchain, its tests, and pytest at the host's versions.

The course's files and pytest live in the image, whose root file system is read-only at
run time, so a submission cannot change the tests that judge it.
"""

from __future__ import annotations

import importlib.metadata as metadata
from pathlib import Path

from packaging.requirements import Requirement

from sandboxd import errors
from sandboxd.grade_runs import GRADER, PLUGIN
from sandboxd.gradebook import Course
from sandboxd.submissions import read_tree


def _closure(root: str) -> list[metadata.Distribution]:
    """`root` and the distributions it needs on this interpreter, by name."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        dist = metadata.distribution(name)
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [seen[k] for k in sorted(seen)]


def pytest_files(prefix: str = "grader/lib") -> dict[str, tuple[bytes, int]]:
    """pytest and its pure-Python dependencies at the host's versions, as context files.

    Raises:
        InvalidArgument: a dependency ships compiled code (it might not run in the image).
    """
    out: dict[str, tuple[bytes, int]] = {}
    for dist in _closure("pytest"):
        for rel in dist.files or []:
            posix = rel.as_posix()
            if posix.startswith("..") or "__pycache__" in posix or posix.endswith(".pyc"):
                continue  # scripts in bin/, bytecode
            if posix.endswith((".so", ".pyd")):
                raise errors.InvalidArgument(
                    f"{dist.metadata['Name']} has compiled code ({posix}); cannot ship it"
                )
            path = Path(str(dist.locate_file(rel)))
            if path.is_file():
                out[f"{prefix}/{posix}"] = (path.read_bytes(), 0o644)
    return out


def grader_context(tests_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Build context: pytest's libraries and the course's tests, under grader/."""
    if not tests_dir.is_dir():
        raise errors.InvalidArgument(f"--tests {tests_dir}: not a directory")
    files = pytest_files()
    plugin = Path(__file__).with_name("grading_plugin.py").read_bytes()
    files[f"grader/lib/{PLUGIN}.py"] = (plugin, 0o644)
    for name, data in read_tree(tests_dir).items():
        files[f"grader/tests/{name}"] = (data, 0o644)
    return files


def image_fragment(course: Course) -> str:
    """The course's toolchain lines first (a cached layer while only its tests change),
    then the grader's files. Bytecode is compiled at build time: the root is read-only at
    run time, and compiling pytest on every run would cost each submission seconds."""
    toolchain = course.dockerfile.strip()
    return (
        f"{toolchain}\n" if toolchain else ""
    ) + f"COPY grader/ {GRADER}/\nRUN python3 -m compileall -q {GRADER}/lib\n"
