"""Pure logic of the plugin's controller side: specs, arguments, records, the collector,
kill messages."""

from __future__ import annotations

import json
import threading

import pytest

from pytest_sandbox.arguments import worker_args
from pytest_sandbox.collector import Collector
from pytest_sandbox.environment import Layer
from pytest_sandbox.models import ItemResult, Placement, RunSettings
from pytest_sandbox.outcome import describe_kill
from pytest_sandbox.records import RecordReader, Tail
from pytest_sandbox.reports import remap_paths
from pytest_sandbox.runner import GroupRunner, Registry
from pytest_sandbox.snapshot import PROJECT, REWRITE_CACHE_LINE, Snapshot, project_files
from pytest_sandbox.spec import Defaults, resolve
from sandboxd.api import BuildResult, ExecResult, Image, ServerInfo
from sandboxd.limits import Caps, Limits

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512m", 512 * MiB), ("64MiB", 64 * MiB), ("1g", 1024 * MiB), (4096, 4096), ("10k", 10240)],
)
def test_memory_takes_the_services_size_syntax(text: object, expected: int) -> None:
    assert resolve({"memory": text}, Defaults(), {}).memory == expected


@pytest.mark.parametrize("bad", ["lots", "-1m", True, "1x"])
def test_memory_refuses_nonsense(bad: object) -> None:
    with pytest.raises(ValueError, match="memory"):
        resolve({"memory": bad}, Defaults(), {})


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


def test_kill_messages_name_the_cause() -> None:
    spec = resolve({"memory": "64m", "pids": 32, "timeout": 2}, Defaults(), {})
    oom = ExecResult(verdict="out_of_memory", message="out of memory (limit 64 MiB)")
    assert describe_kill(oom, spec) == "out of memory (limit 64 MiB)"
    pids = ExecResult(verdict="pids_exhausted")
    assert describe_kill(pids, spec) == "process limit (32) reached"
    assert describe_kill(None, spec, watchdog_timeout=2.0) == "timed out after 2.0s"
    # the worker's hard backstop exits 1 after the timeout: still a timeout
    late = ExecResult(verdict="nonzero_exit", exit_code=1)
    assert describe_kill(late, spec, elapsed=7.5) == "timed out after 2.0s"
    crash = ExecResult(verdict="nonzero_exit", exit_code=139, signal=11)
    assert describe_kill(crash, spec, elapsed=0.1).startswith("sandbox crashed: signal SIGSEGV")
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


def test_environment_caches_rewritten_plugins_once_all_layers_are_in() -> None:
    """The last environment image loads pytest's plugins once at build time, so workers
    find their assert-rewritten bytecode instead of rewriting them at every start."""
    layers = tuple(Layer(name, {f"site/{name}/__init__.py": (b"", 0o644)}) for name in "ab")
    stages = Snapshot(context={}, has_src=False, layers=layers).environment("")
    assert [REWRITE_CACHE_LINE in fragment for fragment, _ in stages] == [False, False, True]


class _InfoOnly:
    """A client that only answers server_info, with an operator's lowered caps."""

    def __init__(self, caps: Caps) -> None:
        self.caps = caps

    def server_info(self) -> ServerInfo:
        return ServerInfo(
            "sandbox.v1", "0", "docker", "0", Limits(), self.caps, (), "default", (), "", 0.0
        )


def test_the_runner_stays_under_the_servers_caps_not_a_copy_of_them() -> None:
    caps = Caps(timeout_seconds=120.0, ttl_seconds=200.0)
    runner = GroupRunner(
        _InfoOnly(caps),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        RunSettings(args=(), cwd=".", env={}),
        Registry(),
        lambda event: None,
        threading.Event(),
    )
    try:
        spec = resolve({"timeout": 30}, Defaults(), {})
        build = BuildResult(Image("k" * 64, "sha256:x", "t", "b"), False, 0.0)
        request = runner.sandbox_spec(build, spec, count=50)
        assert request.limits is not None and request.limits.timeout_seconds == 120.0
        assert request.ttl_seconds == 200.0
        small = runner.sandbox_spec(build, spec, count=1)
        assert small.limits is not None and small.limits.timeout_seconds == 60.0 + 30.0 + 6.0
    finally:
        runner.close()


class _Destroys:
    """A client that only records destroys."""

    def __init__(self) -> None:
        self.destroyed: list[str] = []

    def destroy_sandbox(self, sandbox_id: str) -> None:
        self.destroyed.append(sandbox_id)


def test_a_sandbox_released_after_close_is_destroyed_on_the_callers_thread() -> None:
    client, registry = _Destroys(), Registry()
    runner = GroupRunner(
        client,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        RunSettings(args=(), cwd=".", env={}),
        registry,
        lambda event: None,
        threading.Event(),
    )
    registry.add("sb-late")
    runner.close()  # the session ended (Ctrl-C) while this group's exec was still running
    runner._release("sb-late")
    assert client.destroyed == ["sb-late"]
    registry.destroy_all(client)  # type: ignore[arg-type]
    assert client.destroyed == ["sb-late"], "the registry still held it"


def _collector(pending: list[str], **settings: bool) -> tuple[Collector, list[object]]:
    posted: list[object] = []
    placement = Placement("sb-1", "c-1", "sha256:x")
    run_settings = RunSettings(args=(), cwd="/", env={}, **settings)
    return Collector("n", pending, placement, run_settings, posted.append), posted


def _records(*records: dict[str, object]) -> bytes:
    return b"".join(b"n " + json.dumps(r).encode() + b"\n" for r in records)


def _no_output(timeout: object) -> list[tuple[str, str]]:
    return []


def test_collector_posts_each_finished_test_with_its_reports() -> None:
    collector, posted = _collector(["a", "b"])
    collector.feed(_records({"t": "hello", "pid": 1}, {"t": "start", "nodeid": "a"}))
    collector.feed(_records({"t": "report", "report": {"outcome": "passed"}}))
    collector.feed(_records({"t": "finish", "nodeid": "a"}, {"t": "start", "nodeid": "b"}))
    collector.feed(_records({"t": "report", "report": {"outcome": "failed"}}))
    collector.feed(_records({"t": "finish", "nodeid": "b"}, {"t": "exit", "code": 1}))
    assert [(r.nodeid, r.reports, r.failure) for r in posted] == [  # type: ignore[attr-defined]
        ("a", [{"outcome": "passed"}], None),
        ("b", [{"outcome": "failed"}], None),
    ]
    assert collector.settle("unused", _no_output) == ([], ["b"])
    assert len(posted) == 2


def test_collector_fails_the_killed_test_and_retries_the_rest() -> None:
    collector, posted = _collector(["a", "b", "c"])
    collector.feed(_records({"t": "start", "nodeid": "a"}, {"t": "finish", "nodeid": "a"}))
    collector.feed(_records({"t": "start", "nodeid": "b"}))
    collector.log(b"worker log line\n")
    assert collector.elapsed() is not None and collector.watchdog_seconds() is None
    left, failed = collector.settle("out of memory (limit 64 MiB)", lambda t: [("Captured x", "y")])
    assert (left, failed) == (["c"], ["b"])
    killed = posted[-1]
    assert isinstance(killed, ItemResult) and killed.nodeid == "b"
    assert killed.failure == "out of memory (limit 64 MiB)"
    assert killed.sections == [("Captured x", "y"), ("Captured sandbox log", "worker log line\n")]


def test_collector_without_progress_fails_all_instead_of_retrying() -> None:
    collector, posted = _collector(["a", "b"])
    collector.log(b"ImportError: no module\n")
    assert collector.settle("sandbox crashed: exit code 1", _no_output) == ([], ["a", "b"])
    assert {r.failure for r in posted} == {  # type: ignore[attr-defined]
        "sandbox crashed: exit code 1\nImportError: no module"
    }


def test_collector_reports_uncollected_and_unreached_tests() -> None:
    collector, posted = _collector(["a", "b", "c"])
    collector.feed(_records({"t": "collect", "report": {"longrepr": "SyntaxError"}}))
    collector.feed(_records({"t": "missing", "nodeids": ["a"]}, {"t": "exit", "code": 2}))
    assert collector.settle("unused", _no_output) == ([], ["a", "b", "c"])
    assert [r.failure for r in posted] == [  # type: ignore[attr-defined]
        "not collected in the sandbox:\nSyntaxError",
        "the sandbox worker did not run it",
        "the sandbox worker did not run it",
    ]
    stopped, posted = _collector(["a", "b"], drop_unfinished=True)
    stopped.feed(_records({"t": "exit", "code": 1}))
    assert stopped.settle("unused", _no_output) == ([], []) and posted == []


def test_collector_holds_results_for_keep_failed_and_adds_the_log() -> None:
    collector, posted = _collector(["a"], keep_failed=True)
    collector.feed(_records({"t": "start", "nodeid": "a"}))
    collector.feed(_records({"t": "report", "report": {"outcome": "failed"}}))
    collector.feed(_records({"t": "finish", "nodeid": "a"}, {"t": "exit", "code": 1}))
    collector.log(b"teardown noise")
    assert posted == []
    assert collector.settle("unused", _no_output) == ([], ["a"])
    assert posted[0].sections == [("Captured sandbox log", "teardown noise")]  # type: ignore[attr-defined]


def test_collector_under_fork_fails_a_timed_out_test_and_goes_on() -> None:
    collector, posted = _collector(["a", "b"])
    timeout = {"t": "timeout", "nodeid": "a", "seconds": 2.0, "stack": "s", "stdout": "o"}
    collector.feed(_records({"t": "start", "nodeid": "a"}, timeout))
    collector.feed(_records({"t": "finish", "nodeid": "a"}, {"t": "start", "nodeid": "b"}))
    collector.feed(_records({"t": "finish", "nodeid": "b"}, {"t": "exit", "code": 1}))
    assert [(r.nodeid, r.failure) for r in posted] == [  # type: ignore[attr-defined]
        ("a", "timed out after 2.0s"),
        ("b", None),
    ]
    assert posted[0].sections == [  # type: ignore[attr-defined]
        ("Captured stdout", "o"),
        ("Stack of the test when it timed out", "s"),
    ]
    assert collector.settle("unused", _no_output) == ([], ["a"])


def test_collector_sends_the_rest_to_a_fresh_sandbox_after_a_recycle() -> None:
    collector, posted = _collector(["a", "b", "c"])
    collector.feed(_records({"t": "start", "nodeid": "a"}, {"t": "finish", "nodeid": "a"}))
    collector.feed(_records({"t": "recycle", "reason": "/tmp changed"}))
    assert collector.settle("sandbox crashed: exit code 0", _no_output) == (["b", "c"], [])
    assert [(r.nodeid, r.failure) for r in posted] == [("a", None)]  # type: ignore[attr-defined]


def test_fork_isolated_tests_of_a_spec_share_one_group_per_job() -> None:
    from pathlib import Path

    from pytest_sandbox.controller import make_groups

    class Item:
        def __init__(self, name: str) -> None:
            self.nodeid = f"t.py::{name}"
            self.path = Path("/r/t.py")

    items = [Item(n) for n in "abcde"]
    fork = resolve({"isolation": "fork"}, Defaults())
    container = resolve({"isolation": "container"}, Defaults())
    specs = {it.nodeid: fork for it in items[:4]} | {items[4].nodeid: container}
    groups = make_groups(items, specs, Path("/r"), jobs=2)  # type: ignore[arg-type]
    assert [g.nodeids for g in groups] == [
        ("t.py::a", "t.py::b"),
        ("t.py::c", "t.py::d"),
        ("t.py::e",),
    ]
    assert resolve({"isolation": "fork", "profile": "untrusted"}, Defaults()).isolation == (
        "container"
    )
