"""A batch's submissions, read from a folder: one sub-folder or .zip per submission.

What a submission may contain is checked here, before anything runs: paths stay
relative (no "..", nothing absolute), symlinks are not followed, and the whole is capped.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sandboxd import errors
from sandboxd.paths import check_relative

MAX_SUBMISSION_BYTES = 16 * 1024 * 1024
SKIP_PARTS = frozenset({"__pycache__", ".git", ".pytest_cache", "__MACOSX"})

__all__ = ["Submission", "load_submissions", "read_tree", "read_zip"]


@dataclass(frozen=True)
class Submission:
    name: str
    files: Mapping[str, bytes]


def _add(files: dict[str, bytes], name: str, data: bytes, where: str) -> None:
    rel = check_relative(name, field=where)
    if SKIP_PARTS.intersection(rel.split("/")) or rel.endswith(".pyc"):
        return
    files[rel] = data
    if sum(len(v) for v in files.values()) > MAX_SUBMISSION_BYTES:
        raise errors.InvalidArgument(f"{where}: larger than {MAX_SUBMISSION_BYTES} bytes")


def read_tree(root: Path) -> dict[str, bytes]:
    """Regular files below `root` by relative path; symlinks are not followed.

    Raises:
        InvalidArgument: too large, or a bad path.
    """
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        _add(files, path.relative_to(root).as_posix(), path.read_bytes(), str(root))
    return files


def read_zip(path: Path) -> dict[str, bytes]:
    """Files of a zip, names checked against '..' and absolute paths; a single top folder
    that holds everything is dropped.

    Raises:
        InvalidArgument: not a zip, too large, or a bad member name.
    """
    files: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            if sum(i.file_size for i in members) > MAX_SUBMISSION_BYTES:
                raise errors.InvalidArgument(f"{path}: larger than {MAX_SUBMISSION_BYTES} bytes")
            for info in members:
                _add(files, info.filename, zf.read(info), str(path))
    except zipfile.BadZipFile as exc:
        raise errors.InvalidArgument(f"{path}: not a zip archive ({exc})") from None
    tops = {name.split("/", 1)[0] for name in files}
    if len(tops) == 1 and all("/" in name for name in files):
        files = {name.split("/", 1)[1]: data for name, data in files.items()}
    return files


def load_submissions(directory: Path) -> list[Submission]:
    """One submission per sub-folder or .zip of `directory`, sorted by name.

    Raises:
        InvalidArgument: unreadable directory, duplicate names, or a bad submission.
    """
    if not directory.is_dir():
        raise errors.InvalidArgument(f"--submissions {directory}: not a directory")
    found: dict[str, Submission] = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink() or entry.name.startswith("."):
            continue
        if entry.is_dir():
            name, files = entry.name, read_tree(entry)
        elif entry.suffix == ".zip":
            name, files = entry.stem, read_zip(entry)
        else:
            continue
        if name in found:
            raise errors.InvalidArgument(f"submission {name!r} is both a folder and a zip")
        found[name] = Submission(name, files)
    return list(found.values())
