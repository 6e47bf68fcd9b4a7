"""Pure logic of the plugin's controller side: specs, arguments, records, kill messages."""

from __future__ import annotations

import pytest

from pytest_sandbox.arguments import worker_args
from pytest_sandbox.outcome import describe_kill
from pytest_sandbox.records import RecordReader, Tail
from pytest_sandbox.reports import remap_paths
from pytest_sandbox.snapshot import PROJECT, Snapshot, project_files
from pytest_sandbox.spec import Defaults, parse_memory, resolve
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512m", 512 * MiB), ("64MiB", 64 * MiB), ("1g", 1024 * MiB), (4096, 4096), ("10k", 10240)],
)
def test_parse_memory(text: object, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1m", True, "1x"])
def test_parse_memory_refuses_nonsense(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_memory(bad)


def test_marker_overrides_defaults_and_env_forwards_only_what_is_named() -> None:
    defaults = Defaults(memory=256 * MiB, scope="module", timeout=30.0)
    spec = resolve(
        {"memory": "64m", "env": ["KEEP", "ABSENT"]}, defaults, {"KEEP": "1", "SECRET": "x"}
    )
    assert spec.memory == 64 * MiB
    assert spec.scope == "module" and spec.timeout == 30.0
    assert spec.env == (("KEEP", "1"),)
    assert resolve({"env": {"A": 1}}, defaults, {}).env == (("A", "1"),)
    with pytest.raises(ValueError):
        resolve({"scope": "class"}, defaults, {})
    with pytest.raises(ValueError):
        resolve({"timeout": 0}, defaults, {})


def test_equal_specs_share_a_group_key() -> None:
    a = resolve({"memory": "64m"}, Defaults(), {})
    b = resolve({"memory": 64 * MiB}, Defaults(), {})
    assert a == b and hash(a) == hash(b)


def test_worker_args_keep_what_shapes_a_run_and_drop_host_side_options() -> None:
    args = worker_args(
        [
            "-vv", "--tb=short", "-k", "slow", "--junitxml", "out.xml", "tests/",
            "-W", "error", "-p", "no:randomly", "-p", "xdist", "-p", "pytester",
            "--sandbox=all", "-x", "-rA", "--maxfail", "2", "-o", "x=1", "-n", "4",
        ],
        plugin_ok=lambda name: name == "pytester",
    )  # fmt: skip
    assert args == [
        "-vv", "--tb", "short", "-W", "error", "-p", "no:randomly", "-p", "pytester",
        "-x", "--maxfail", "2", "-o", "x=1",
    ]  # fmt: skip


def test_record_reader_trusts_only_framed_lines_and_handles_split_chunks() -> None:
    reader = RecordReader("abc")
    data = b'abc {"t":"start","nodeid":"x"}\nforged {"t":"exit"}\nabc not json\nabc {"t":"fi'
    assert list(reader.feed(data)) == [{"t": "start", "nodeid": "x"}]
    assert list(reader.feed(b'nish"}\n')) == [{"t": "finish"}]
    assert reader.dropped == 2


def test_tail_keeps_the_end() -> None:
    tail = Tail(limit=4)
    tail.add(b"abcdef")
    assert tail.text() == "[...]\ncdef"


def _result(**kw: object) -> pb.ExecResult:
    return pb.ExecResult(**kw)  # type: ignore[arg-type]


def test_kill_messages_name_the_cause() -> None:
    spec = resolve({"memory": "64m", "pids": 32, "timeout": 2}, Defaults(), {})
    oom = _result(verdict=pb.VERDICT_OUT_OF_MEMORY, message="out of memory (limit 64 MiB)")
    assert describe_kill(oom, spec) == "out of memory (limit 64 MiB)"
    assert describe_kill(_result(verdict=pb.VERDICT_PIDS_EXHAUSTED), spec) == (
        "process limit (32) reached"
    )
    assert describe_kill(None, spec, watchdog_timeout=2.0) == "timed out after 2.0s"
    # the worker's hard backstop exits 1 after the timeout: still a timeout
    late = _result(verdict=pb.VERDICT_NONZERO_EXIT, exit_code=1)
    assert describe_kill(late, spec, elapsed=7.5) == "timed out after 2.0s"
    crash = _result(verdict=pb.VERDICT_NONZERO_EXIT, exit_code=139, signal=11)
    assert describe_kill(crash, spec, elapsed=0.1).startswith("sandbox crashed: signal 11")
    assert describe_kill(None, spec, error="gone").startswith("sandbox error: gone")


def test_remap_paths_points_reports_at_the_host() -> None:
    data = {
        "longrepr": [f"{PROJECT}/t/test_a.py", 3, "Skipped: x"],
        "reprcrash": {"path": f"{PROJECT}/t/test_a.py", "lineno": 3},
        "other": {"path": "/usr/lib/x.py"},
    }
    out = remap_paths(data, "/home/me/proj")
    assert out["longrepr"] == ("/home/me/proj/t/test_a.py", 3, "Skipped: x")
    assert out["reprcrash"]["path"] == "/home/me/proj/t/test_a.py"
    assert out["other"]["path"] == "/usr/lib/x.py"


def test_snapshot_skips_vcs_venvs_caches_and_build_output(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    skipped = [".git/HEAD", "build/x.py", "myenv/pyvenv.cfg", "pkg/__pycache__/a.pyc"]
    for rel in ["src/pkg/__init__.py", "tests/test_a.py", "run.sh", *skipped]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / "run.sh").chmod(0o755)
    files = project_files(root)
    assert sorted(files) == [
        "project/run.sh",
        "project/src/pkg/__init__.py",
        "project/tests/test_a.py",
    ]
    assert files["project/run.sh"][1] == 0o755
    snap = Snapshot(context=files, has_src=True)
    assert snap.pythonpath().split(":")[1] == f"{PROJECT}/src"
    stages = snap.environment("RUN apt-get install -y jq")
    assert stages[0][0].splitlines()[0] == "RUN apt-get install -y jq"  # user layers first
