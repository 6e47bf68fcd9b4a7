"""The fork-reset's file-tree logic, run here on a temporary tree (never on "/")."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_sandbox.pristine import restore, trees


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
