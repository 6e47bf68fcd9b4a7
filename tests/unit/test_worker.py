"""The in-sandbox worker's own logic, run here against fake cgroup files and pipes."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from _pytest.config.argparsing import Parser

from pytest_sandbox.worker import Cgroup, Channel, accept_host_options, read_capture


def test_cgroup_v1_names_the_limit_that_was_hit(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "pids").mkdir()
    (tmp_path / "memory/memory.oom_control").write_text("oom_kill_disable 0\noom_kill 1\n")
    (tmp_path / "memory/memory.limit_in_bytes").write_text(str(64 << 20))
    (tmp_path / "pids/pids.events").write_text("max 0\n")
    (tmp_path / "pids/pids.max").write_text("32\n")
    cg = Cgroup(str(tmp_path))
    assert cg.counters() == (1, 0)
    assert cg.explain((0, 0), cg.counters()) == "out of memory (limit 64 MiB)"
    assert cg.explain((0, 0), (0, 3)) == "process limit (32) reached"
    assert cg.explain((1, 0), (1, 0)) is None


def test_cgroup_v2_reads_the_unified_files(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 2\n")
    (tmp_path / "pids.events").write_text("max 5\n")
    (tmp_path / "memory.max").write_text(str(96 << 20))
    cg = Cgroup(str(tmp_path))
    assert cg.counters() == (2, 5)
    assert cg.explain((1, 5), (2, 5)) == "out of memory (limit 96 MiB)"


def test_read_capture_tolerates_missing_files(tmp_path: Path) -> None:
    (tmp_path / "stdout").write_bytes(b"printed\n")
    assert read_capture(str(tmp_path)) == {"stdout": "printed\n", "stderr": ""}


def _records(path: Path) -> list[str]:
    return [json.loads(line.split(b" ", 1)[1])["t"] for line in path.read_bytes().splitlines()]


def _channel(path: Path) -> Channel:
    """A channel writing to a file, as the worker's does to its private stdout."""
    return Channel(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "n0nce")


def test_held_records_leave_with_the_next_sent_one_in_order(tmp_path: Path) -> None:
    out = tmp_path / "out"
    channel = _channel(out)
    channel.hold("report")
    channel.hold("finish")
    assert _records(out) == []
    channel.send("start")
    assert _records(out) == ["report", "finish", "start"]


def test_a_test_childs_records_reach_the_channel_through_the_worker_in_order(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    worker, child = _channel(out), _channel(out)
    pipe = os.pipe()
    for fd in pipe:
        os.set_blocking(fd, False)
    child.adopt(pipe)  # as in the forked child: what it holds goes into the pipe
    child.send("report")  # the setup report: live
    child.hold("report")
    child.hold("warning", message="x" * (1 << 17))  # more than the pipe holds: all out now
    child.hold("report")
    assert _records(out) == ["report", "report", "warning"]
    worker.hold_taken(pipe[0])  # the child ended: the worker takes what is left
    worker.hold("finish")
    worker.send("start")
    assert _records(out) == ["report", "report", "warning", "report", "finish", "start"]


def test_xdist_options_from_the_host_mean_nothing_where_xdist_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "xdist" else real(name, *a)
    )
    parser = Parser()
    accept_host_options(parser)
    parsed = parser.parse(["test_x.py", "-n", "0", "--dist", "loadgroup", "--sandbox-embedded"])
    assert parsed.sandbox_embedded
    assert parsed.file_or_dir == ["test_x.py"]


def test_xdist_options_are_left_to_xdist_where_it_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    parser = Parser()
    accept_host_options(parser)
    with pytest.raises(pytest.UsageError, match="unrecognized arguments: -n"):  # xdist's own
        parser.parse(["-n", "0"])
