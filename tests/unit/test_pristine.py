"""The fork-reset's file-tree logic, run here on a temporary tree (never on "/")."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_sandbox.pristine import _writable_mounts, restore, trees


def test_scrub_removes_what_is_new_and_keeps_the_record_and_the_worker_files(
    tmp_path: Path,
) -> None:
    (tmp_path / "kept.txt").write_text("from the image")
    (tmp_path / "capture").mkdir()
    roots = (str(tmp_path),)
    keep = str(tmp_path / "capture")
    base = trees(roots, keep)
    (tmp_path / "new.txt").write_text("left by a test")
    locked = tmp_path / "new-dir" / "deep"
    locked.mkdir(parents=True)
    (locked / "f").write_text("x")
    os.chmod(tmp_path / "new-dir", 0o500)
    (tmp_path / "capture" / "stdout").write_text("the worker's own")
    assert restore(roots, base, keep) == []
    assert sorted(os.listdir(tmp_path)) == ["capture", "kept.txt"]
    assert (tmp_path / "capture" / "stdout").exists()
    assert restore(roots, base, keep) == []


def test_what_a_reset_cannot_undo_is_reported(tmp_path: Path) -> None:
    (tmp_path / "changed.txt").write_text("v1")
    (tmp_path / "gone.txt").write_text("v1")
    roots = (str(tmp_path),)
    base = trees(roots, str(tmp_path / "capture"))
    (tmp_path / "changed.txt").write_text("version 2")
    (tmp_path / "gone.txt").unlink()
    os.chmod(tmp_path, 0o700)
    (tmp_path / "new.txt").write_text("left by a test")
    problems = restore(roots, base, str(tmp_path / "capture"))
    assert f"{tmp_path / 'changed.txt'} changed" in problems
    assert f"{tmp_path / 'gone.txt'} is gone" in problems
    assert not (tmp_path / "new.txt").exists()  # removed in the same pass that checked
    assert len(problems) == 2


MOUNTINFO = """\
22 1 0:40 / / ro,relatime master:1 - overlay overlay ro,lowerdir=/a
23 22 0:41 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
24 22 0:42 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
25 24 0:43 / /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw
26 24 0:44 / /dev/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=65536k
27 22 0:45 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
28 27 0:46 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup rw
29 22 0:47 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw
30 29 0:48 / /tmp/inner rw,nosuid,nodev - tmpfs tmpfs rw
31 22 0:49 / /sandbox/my\\040work rw,nosuid,nodev - tmpfs tmpfs rw
32 22 8:1 /etc/hosts /etc/hosts ro,relatime - ext4 /dev/sda1 rw
33 22 8:1 /data /data ro,relatime - ext4 /dev/sda1 rw
"""


def test_a_read_only_root_is_walked_only_from_its_writable_mounts(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(MOUNTINFO)
    # /proc and /sys are skipped, /dev's own children are filtered by the walk, a mount
    # inside another writable one is reached from it, read-only mounts are never starts.
    assert _writable_mounts(str(table)) == ["/dev", "/sandbox/my work", "/tmp"]


def test_a_writable_root_or_an_unread_table_means_the_whole_walk(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(MOUNTINFO.replace("/ / ro,relatime", "/ / rw,relatime"))
    assert _writable_mounts(str(table)) is None
    assert _writable_mounts(str(tmp_path / "missing")) is None
