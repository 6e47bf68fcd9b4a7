"""Runs INSIDE the sandbox: pytest in-process on the tests the controller names.

Stand-alone on purpose: it is copied into the image next to pytest and imports
nothing from the controller side.

Protocol. stdin carries one JSON request line: {"nonce", "args", "files", "nodeids",
"cwd", "capture_dir", "timeout"}. Records leave as lines `<nonce> <json>` on a
private duplicate of the original stdout; fds 1 and 2 both point at stderr while
tests run, so nothing a test prints can forge or break a record. Records:
start{nodeid}, report{report}, finish{nodeid}, collect{report},
missing{nodeids}, timeout{nodeid, seconds, stack, stdout, stderr}, exit{code},
and with "fork" in the request (isolation="fork", see pristine.py) recycle{reason}:
the worker ends before the rest of its tests, which want a fresh sandbox. With "debug",
debug{nodeid, pid, file}: a debugger wants the user's terminal (see debugger.py).
With "coverage" in the request, the run is measured into its data file.
Every record carries "ts", the sandbox's wall clock when it was said (same clock as the
host's: benchmarks/pertest.py splits a test's cost with it). Reports that the host needs
only once the test ends (a forked test's call and teardown, an unforked test's teardown)
and the finish record are held and leave in one write with the next test's start (see
Channel): each write is a message through the engine's stream, sandboxd and gRPC.

Size: one stand-alone file on purpose (it is shipped alone and imports nothing of ours),
so the channel, the watchdog and the cgroup counters live here next to the plugin.
"""

from __future__ import annotations

import _thread
import contextlib
import faulthandler
import gc
import importlib.util
import itertools
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator
from typing import IO, Any

import pytest

# Output a killed test printed is recovered from these files (the capture
# plugin's temporary files, given names so they survive the worker).
CAPTURE_NAMES = ("stdout", "stderr")
# faulthandler's hard exit catches tests that hold the GIL past the watchdog.
HARD_TIMEOUT_GRACE = 5.0
# The worker's own clocks. A test may move time.monotonic and time.time (freezegun,
# mock.patch) in the very process whose timeout the watchdog keeps; clock_gettime,
# bound here, is out of its reach.
_clock_gettime = time.clock_gettime


def monotonic() -> float:
    return _clock_gettime(time.CLOCK_MONOTONIC)


def wall_clock() -> float:
    return _clock_gettime(time.CLOCK_REALTIME)


class Channel:
    """The private result channel; only the worker's own process may write to it.

    Every write wakes the engine's stream and costs the host a message, so records
    that need not be seen at once are held and go out with the next one that must (a
    test's start, the end). A forked test child holds its records in a pipe to the
    worker, which outlives a crashing child and passes them on.
    """

    def __init__(self, fd: int, nonce: str) -> None:
        self._fd = fd
        self._nonce = nonce
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._held: list[bytes] = []
        self._pipe: tuple[int, int] | None = None  # a test child's (read, write) to us

    def adopt(self, pipe: tuple[int, int]) -> None:
        """In the worker's own forked test child: that child now speaks for the worker,
        and holds its records in `pipe` (non-blocking ends), which the worker reads."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._held = []
        self._pipe = pipe

    def _line(self, kind: str, data: dict[str, Any]) -> bytes:
        data["t"] = kind
        data["ts"] = wall_clock()  # when it was said: the host splits a test's cost with it
        text = json.dumps(data, default=repr, separators=(",", ":"))
        return f"{self._nonce} {text}\n".encode("utf-8", "replace")

    def send(self, kind: str, **data: Any) -> None:
        """Out now, after what is held."""
        if os.getpid() == self._pid:  # a test's forked child must not speak for us
            self.flush(self._line(kind, data))

    def hold(self, kind: str, **data: Any) -> None:
        """Out with the next `send` (the worker's, for a test child's records)."""
        if os.getpid() != self._pid:
            return
        line = self._line(kind, data)
        if self._pipe is None:
            with self._lock:
                self._held.append(line)
            return
        try:
            written = os.write(self._pipe[1], line)
        except BlockingIOError:
            written = 0
        if written < len(line):  # the pipe is full: what is in it goes out now, in order
            self.flush(line[written:])

    def flush(self, line: bytes = b"") -> None:
        """What is held, then `line`, out now."""
        with self._lock:
            out, self._held = b"".join([*self._held, self.take(), line]), []
            view = memoryview(out)
            while view:
                view = view[os.write(self._fd, view) :]

    def take(self, pipe: int | None = None) -> bytes:
        """What waits in a test child's pipe (the worker's end: `pipe`)."""
        if pipe is None and self._pipe is None:
            return b""
        fd = pipe if pipe is not None else self._pipe[0]  # type: ignore[index]
        chunks = []
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def hold_taken(self, pipe: int) -> None:
        """Hold what a test child left in `pipe` when it ended."""
        data = self.take(pipe)
        if data:
            with self._lock:
                self._held.append(data)


class Cgroup:
    """Counters of the sandbox's own cgroup (v2 unified, or v1 per controller)."""

    def __init__(self, root: str = "/sys/fs/cgroup") -> None:
        v2 = os.path.exists(f"{root}/cgroup.controllers")
        if v2:
            self.oom_file, self.oom_key = f"{root}/memory.events", "oom_kill"
            self.pids_file = f"{root}/pids.events"
            self.mem_limit_file, self.pids_limit_file = f"{root}/memory.max", f"{root}/pids.max"
        else:
            self.oom_file, self.oom_key = f"{root}/memory/memory.oom_control", "oom_kill"
            self.pids_file = f"{root}/pids/pids.events"
            self.mem_limit_file = f"{root}/memory/memory.limit_in_bytes"
            self.pids_limit_file = f"{root}/pids/pids.max"

    @staticmethod
    def _read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""

    def _counter(self, path: str, key: str) -> int:
        for line in self._read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
        return 0

    def counters(self) -> tuple[int, int]:
        return self._counter(self.oom_file, self.oom_key), self._counter(self.pids_file, "max")

    def explain(self, before: tuple[int, int], after: tuple[int, int]) -> str | None:
        """The limit that was hit between two counter readings, in the service's words."""
        if after[0] > before[0]:
            limit = self._read(self.mem_limit_file).strip()
            if limit.isdigit():
                return f"out of memory (limit {int(limit) // (1024 * 1024)} MiB)"
            return "out of memory"
        if after[1] > before[1]:
            return f"process limit ({self._read(self.pids_limit_file).strip()}) reached"
        return None


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[3])


def _ours() -> list[int]:
    """Processes the tests started: our descendants, or orphans still in our session."""
    me = os.getpid()
    sid = os.getsid(0)
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            info = _stat(int(entry))
            if info is not None:
                table[int(entry)] = info
    found = []
    for pid, (ppid, session) in table.items():
        chain, seen = ppid, 0
        while chain not in (me, 0, 1) and chain in table and seen < 64:
            chain, seen = table[chain][0], seen + 1
        if pid != 1 and (chain == me or (sid > 0 and session == sid)):
            found.append(pid)
    return found


def reap_strays() -> None:
    """Kill what the tests left running, so the exec can end.

    A test's background processes hold the output pipes open; left alone they
    would keep the exec (and the controller) waiting. The container's own
    processes are in another session and are never touched.
    """
    for _ in range(50):
        victims = _ours()
        for pid in victims:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        if not victims:
            return
        time.sleep(0.02)


def read_capture(capture_dir: str) -> dict[str, str]:
    out = {}
    for name in CAPTURE_NAMES:
        try:
            with open(os.path.join(capture_dir, name), "rb") as f:
                out[name] = f.read().decode("utf-8", "replace")
        except OSError:
            out[name] = ""
    return out


class Watchdog:
    """Ends the worker when one test runs past its timeout, after saying so."""

    def __init__(self, on_expire: Callable[[str, float], None]) -> None:
        self._on_expire = on_expire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._nodeid = ""
        self._seconds = 0.0
        # A bare thread: threading's would make every forked test child wait for it to
        # start, and would show in the test's threading.enumerate().
        _thread.start_new_thread(self._run, ())

    def arm(self, nodeid: str, seconds: float) -> None:
        with self._cond:
            self._nodeid, self._seconds = nodeid, seconds
            self._deadline = monotonic() + seconds
            self._cond.notify()
        faulthandler.dump_traceback_later(seconds + HARD_TIMEOUT_GRACE, exit=True)

    def disarm(self, *, exiting: bool = False) -> None:
        """`exiting`: the process ends next, and faulthandler's thread with it (cancelling
        it waits for that thread to end: a forked test child would pay it every test)."""
        if not exiting:
            faulthandler.cancel_dump_traceback_later()
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._deadline is None or monotonic() < self._deadline:
                    wait = None if self._deadline is None else self._deadline - monotonic()
                    self._cond.wait(wait)
                nodeid, seconds = self._nodeid, self._seconds
            self._on_expire(nodeid, seconds)


def accept_host_options(parser: Any) -> None:
    """The host's ini file and addopts come along with the project: accept the plugin's
    own names, so they are not unknown options inside. The controller passes `-n 0` when
    the host has pytest-xdist (addopts may say `-n 4`); where the sandbox's environment
    lacks xdist (sandbox_requirements), its options are accepted and mean nothing."""
    group = parser.getgroup("sandbox")
    for opt, kwargs in (
        ("--sandbox", {"nargs": "?", "const": "marked", "default": None}),
        ("--sandbox-scope", {}),
        ("--sandbox-address", {}),
        ("--sandbox-jobs", {}),
        ("--sandbox-keep-failed", {"action": "store_true"}),
        ("--sandbox-embedded", {"action": "store_true"}),
        ("--sandbox-isolation", {}),
    ):
        with contextlib.suppress(ValueError):
            group.addoption(opt, **kwargs)
    if importlib.util.find_spec("xdist") is None:
        for flags in (("-n", "--numprocesses"), ("--dist",), ("--maxprocesses",)):
            with contextlib.suppress(ValueError):
                group._addoption(*flags, dest=f"sandbox_ignored_{flags[-1][2:]}")
    names = "image scope dockerfile cpus memory pids timeout address embedded jobs required"
    for name in (*names.split(), "profile", "isolation", "recycle", "requirements"):
        with contextlib.suppress(ValueError):
            parser.addini(f"sandbox_{name}", "ignored inside the sandbox")


class WorkerPlugin:
    """Streams each report as soon as its test ends; keeps only the requested tests."""

    def __init__(self, channel: Channel, request: dict[str, Any]) -> None:
        self.channel = channel
        self.wanted: list[str] = request["nodeids"]
        self.timeout = float(request["timeout"])
        self.capture_dir = request["capture_dir"]
        self.real_stdout: IO[str] | None = None
        self.cgroup = Cgroup()
        self.config: Any = None
        self._nodeid = ""
        self.coverage: Any = None  # a started coverage.Coverage when the host measures
        self._counters = (0, 0)
        self.watchdog = Watchdog(self.expired)
        self.forker: Any = None
        if request.get("fork"):
            self.forker = _forker(self, request)

    def enter_child(self, on_expire: Callable[[str, float], None], pipe: tuple[int, int]) -> None:
        """In a forked test child: its own channel and watchdog (threads do not fork)."""
        self.channel.adopt(pipe)
        self.watchdog = Watchdog(on_expire)
        self.watchdog.arm(self._nodeid, self.timeout)

    def pytest_addoption(self, parser: Any) -> None:
        accept_host_options(parser)

    def pytest_configure(self, config: Any) -> None:
        self.config = config
        config.addinivalue_line("markers", "sandbox(**kwargs): run in a sandbox (host side)")
        if config.getoption("capture") == "no" and self.real_stdout is not None:
            sys.stdout = self.real_stdout  # -s: test output goes to the exec's stderr live

    def _serialize(self, report: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.config.hook.pytest_report_to_serializable(
            config=self.config, report=report
        )
        return data

    def pytest_collection_modifyitems(self, session: Any, config: Any, items: list[Any]) -> None:
        order = {nodeid: i for i, nodeid in enumerate(self.wanted)}
        keep = sorted((it for it in items if it.nodeid in order), key=lambda it: order[it.nodeid])
        dropped = [it for it in items if it.nodeid not in order]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
        found = {it.nodeid for it in keep}
        missing = [n for n in self.wanted if n not in found]
        if missing:
            self.channel.send("missing", nodeids=missing)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: Any, exitstatus: Any) -> None:
        # Every report is out and the project's own sessionfinish hooks have run. What
        # is left of pytest's shutdown (terminal summary, the garbage collections of
        # unconfigure, interpreter teardown) shows nobody anything in a throwaway
        # sandbox but costs a fresh container ~50 ms of CPU.
        if self.coverage is not None:  # saved before the exit record: the host reads it next
            self.coverage.stop()
            self.coverage.save()
        self.channel.send("exit", code=int(exitstatus))
        reap_strays()
        sys.stderr.flush()
        os._exit(0)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.channel.send("collect", report=self._serialize(report))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: Any, nextitem: Any) -> Generator[None, object, object]:
        self.channel.send("start", nodeid=item.nodeid)
        self._counters = self.cgroup.counters()
        self._nodeid = item.nodeid
        if self.forker is None:  # with fork, the test's child has the watchdog
            self.watchdog.arm(item.nodeid, self.timeout)
        try:
            return (yield)
        finally:
            self.watchdog.disarm()
            if self.forker is None and self.cgroup.counters()[1] > self._counters[1]:
                reap_strays()  # a fork bomb's leftovers would starve the next test
            self.channel.hold("finish", nodeid=item.nodeid)  # out with the next start
            if self.forker is not None:
                self.forker.after(nextitem, self.cgroup.counters() != self._counters)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed:
            reason = self.cgroup.explain(self._counters, self.cgroup.counters())
            if reason is not None:
                crash = getattr(report.longrepr, "reprcrash", None)
                if crash is not None:
                    crash.message = f"{reason}; {crash.message}"
                report.sections.append(("sandbox limit", reason))
        # The phase a kill would interrupt next needs the report before it at the host:
        # a forked child's worker outlives the call (and passes its report on), without
        # a fork only the teardown is the last phase.
        if report.when == "teardown" or (self.forker is not None and report.when == "call"):
            self.channel.hold("report", report=self._serialize(report))
        else:
            self.channel.send("report", report=self._serialize(report))

    def pytest_warning_recorded(
        self, warning_message: Any, when: str, nodeid: str, location: Any
    ) -> None:
        # Collection warnings reach the host from its own collection of the same files.
        if when != "runtest":
            return
        category = warning_message.category
        self.channel.hold(
            "warning",
            nodeid=nodeid,
            message=str(warning_message.message),
            category=f"{category.__module__}.{category.__qualname__}",
            filename=str(warning_message.filename),
            lineno=int(warning_message.lineno or 0),
        )

    def expired(self, nodeid: str, seconds: float) -> None:
        frames = sys._current_frames()
        main = frames.get(threading.main_thread().ident or 0)
        # Only the test's own frames: pytest's and the worker's say nothing new.
        summary = traceback.extract_stack(main) if main is not None else traceback.StackSummary()
        lib = os.path.dirname(os.path.abspath(__file__))
        own = [f for f in summary if not f.filename.startswith(lib + os.sep)]
        stack = "".join(traceback.format_list(own or list(summary)[-5:]))
        captured = read_capture(self.capture_dir)
        self.channel.send(
            "timeout",
            nodeid=nodeid,
            seconds=seconds,
            stack=stack,
            stdout=captured["stdout"],
            stderr=captured["stderr"],
        )
        reap_strays()
        os._exit(124)


def _forker(worker: WorkerPlugin, request: dict[str, Any]) -> Any:
    """The fork-per-test plugin (pristine.py), shipped next to this file into the sandbox."""
    import pytest_sandbox_pristine  # type: ignore[import-not-found]

    recycle_after = int(request.get("recycle_after") or 0)
    return pytest_sandbox_pristine.Forker(worker, recycle_after, float(request["deadline"]))


def _name_capture_files(capture_dir: str) -> None:
    """Give the global capture's two temporary files known names (stdout, stderr).

    The capture plugin creates them first, in that order; later ones (capfd and
    friends) stay anonymous. Without the hook the worker still works; only the
    output of a killed test is lost.
    """
    try:
        import _pytest.capture as capmod
    except ImportError:
        return
    original = getattr(capmod, "TemporaryFile", None)  # pytest imports it by name
    if original is None:
        return
    counter = itertools.count()

    def named(*args: Any, **kwargs: Any) -> Any:
        n = next(counter)
        if n >= len(CAPTURE_NAMES):
            return original(*args, **kwargs)
        return open(os.path.join(capture_dir, CAPTURE_NAMES[n]), "w+b", buffering=0)

    capmod.TemporaryFile = named  # type: ignore[attr-defined]


def start_coverage(options: dict[str, Any] | None) -> Any:
    """Measure the run with coverage.py when the host's pytest-cov does (pytest-cov's own
    options, paths as seen here); the controller reads the data file back and combines
    it on the host. Without coverage.py in the sandbox nothing is measured, and said so."""
    if not options:
        return None
    try:
        import coverage
    except ImportError:
        print("pytest-sandbox: coverage is not importable in the sandbox", file=sys.stderr)
        return None
    cov = coverage.Coverage(
        data_file=options["data_file"],
        source=options["source"] or None,
        branch=options["branch"] or None,
        config_file=options["config_file"],
    )
    cov.start()
    return cov


def import_builtin_plugins() -> None:
    """Import the modules of pytest's own plugins, which every pytest.main imports: a
    preloaded worker does it while it waits for its request. Not the installed plugins:
    one the request disables (-p no:NAME) must stay unimported."""
    try:
        from _pytest.config import default_plugins, essential_plugins
    except ImportError:  # another pytest's layout: pytest.main imports them itself
        return
    for name in (*essential_plugins, *default_plugins):
        with contextlib.suppress(Exception):
            importlib.import_module(f"_pytest.{name}")


def main() -> int:
    if "fork" in sys.argv[1:]:  # isolation="fork": the walk for writable places starts now
        __import__("pytest_sandbox_pristine").prefetch_places()
    import_builtin_plugins()
    # What is loaded now lives as long as the worker: later collections (the session's,
    # each forked test's) skip it, and a forked child shares its pages untouched.
    gc.freeze()
    # One line, not EOF: a preloaded worker's stdin can stay open after the request.
    request = json.loads(sys.stdin.buffer.readline())
    os.makedirs(request["capture_dir"], exist_ok=True)
    channel = Channel(os.dup(1), request["nonce"])
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    real_stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stdout = real_stdout
    os.chdir(request["cwd"])
    code = 3
    try:
        _name_capture_files(request["capture_dir"])
        plugin = WorkerPlugin(channel, request)
        plugin.real_stdout = real_stdout
        # The worker's own terminal output is noise; reports travel as records.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        plugin.coverage = start_coverage(request.get("coverage"))
        plugins = [plugin] if plugin.forker is None else [plugin, plugin.forker]
        if request.get("debug"):  # pdb on the user's terminal (debugger.py, shipped alongside)
            import pytest_sandbox_debugger  # type: ignore[import-not-found]

            plugins.append(pytest_sandbox_debugger.configure(plugin, request["capture_dir"]))
        code = int(pytest.main(list(request["args"]) + list(request["files"]), plugins=plugins))
    except BaseException:
        channel.send("error", text=traceback.format_exc())
    channel.send("exit", code=code)
    reap_strays()
    return 0


if __name__ == "__main__":
    sys.exit(main())
