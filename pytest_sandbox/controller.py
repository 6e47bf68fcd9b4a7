"""Takes routed tests out of the normal loop, runs them in sandboxes, replays their reports.

Like pytest-xdist's DSession: the session keeps one pytest_runtestloop; routed
items go to pool threads group by group, unrouted items run here as usual, and
every report is fired on the main thread through the item's own hooks, so the
terminal, -x, --lf and junitxml see nothing unusual.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_sandbox import debugging, environment, reuse, snapshot
from pytest_sandbox.arguments import worker_args
from pytest_sandbox.coverage_data import coverage_spec
from pytest_sandbox.kept import kept_lines, service_address
from pytest_sandbox.models import (
    DebugRequest,
    Group,
    GroupDone,
    ItemResult,
    Kept,
    RunSettings,
    WarningRecord,
)
from pytest_sandbox.progress import BuildLine
from pytest_sandbox.reports import adopt_subtests, kill_reports, remap_paths, warning_message
from pytest_sandbox.spec import RouteSpec
from pytest_sandbox.startup import Startup, freeze_heap
from sandboxd import daemon, errors
from sandboxd.connection import Connection

if TYPE_CHECKING:
    # With grpc (~0.5 s): imported by the thread that connects while pytest collects.
    from pytest_sandbox.runner import GroupRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    mode: str  # "marked" or "all"
    address: str | None
    jobs: int
    keep_failed: bool
    #: This process has a terminal: pdb in a sandbox (--pdb, breakpoint()) may use it.
    debug: bool = False
    embedded: bool = False


def make_groups(
    items: Iterable[pytest.Item], specs: dict[str, RouteSpec], rootdir: Path, jobs: int = 1
) -> list[Group]:
    """Group routed items by (spec, scope key), in order of first appearance.

    Fork-isolated tests of one spec share a recycled container per job slot: their
    spec's tests are cut into up to `jobs` consecutive runs (files stay together).
    """
    items = list(items)
    buckets: dict[tuple[object, ...], list[pytest.Item]] = {}
    per_spec = Counter(specs[it.nodeid] for it in items if specs[it.nodeid].forks)
    seen: Counter[RouteSpec] = Counter()
    for item in items:
        spec = specs[item.nodeid]
        if spec.forks:
            size = -(-per_spec[spec] // max(1, jobs))  # ceil: at most `jobs` runs
            key: tuple[object, ...] = (spec, "fork", seen[spec] // size)
            seen[spec] += 1
        elif spec.scope == "test":
            key = (spec, item.nodeid)
        elif spec.scope == "module":
            key = (spec, str(item.path))
        else:
            key = (spec,)
        buckets.setdefault(key, []).append(item)
    groups = []
    for key, members in buckets.items():
        files = dict.fromkeys(_relpath(it.path, rootdir) for it in members)
        groups.append(
            Group(spec=key[0], nodeids=tuple(it.nodeid for it in members), files=tuple(files))  # type: ignore[arg-type]
        )
    return groups


def _relpath(path: Path, rootdir: Path) -> str:
    try:
        return path.relative_to(rootdir).as_posix()
    except ValueError:
        return str(path)


def _project_label(rootdir: Path) -> str:
    return hashlib.sha256(str(rootdir.resolve()).encode()).hexdigest()[:12]


def _mirrored(plugin: str) -> bool:
    """Whether a plugin named with -p exists inside: all but the host-only sandbox plugin."""
    return not plugin.startswith(("sandbox", "pytest_sandbox"))


@dataclass
class Controller:
    config: pytest.Config
    options: Options
    specs: dict[str, RouteSpec] = field(default_factory=dict)
    kept: list[Kept] = field(default_factory=list)
    connection: Connection | None = None
    _events: queue.Queue[object] = field(default_factory=queue.Queue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _startup: Startup | None = None
    _runner: GroupRunner | None = None

    def start(self) -> None:
        """At configure time: the snapshot and the service, while pytest collects."""
        if not self.config.option.collectonly:  # --co needs neither service nor snapshot
            freeze_heap(last=False)
            self._startup = Startup(self._take, self._connect, self._prepare)

    def _take(self) -> snapshot.Snapshot:
        xmlpath = getattr(self.config.option, "xmlpath", None)
        # Files the session writes are not the project's, even when under it
        # (pytester's HOME is the project: the reuse file is then inside).
        outputs = [Path(xmlpath)] if xmlpath else []
        outputs.append(reuse.default_path())
        requirements = str(self.config.getini("sandbox_requirements"))
        return snapshot.take(self.config.rootpath, outputs, requirements, lazy=True)

    def _prepare(self, conn: Connection, snap: snapshot.Snapshot) -> None:
        self._runner = self._make_runner(conn, snap)
        freeze_heap(last=True)

    def _connect(self) -> Connection:
        """The address given, else a service in this session, else the local daemon.

        Raises:
            SandboxError: none can be reached or started.
        """
        connection = daemon.open_connection(
            self.options.address,
            local=not self.options.embedded,
            address_option="--sandbox-address",
        )
        # Asked now, while the snapshot is taken, rather than by the first group's
        # create (the service asks its engine: tens of ms); a failure is raised there.
        with contextlib.suppress(errors.SandboxError):
            connection.client.server_info()
        return connection

    def forced_isolation(self) -> str | None:
        """Why scope-test tests get a fresh container whatever their isolation says."""
        if self.options.keep_failed:
            # A kept sandbox must be the failed test's own, not one reset for the next test.
            return "--sandbox-keep-failed"
        if coverage_spec(self.config, snapshot.PROJECT) is not None:
            # Coverage saves its data as the worker ends, while a forked test child ends
            # with os._exit and would take its measurements along.
            return "--cov"
        return None

    def _ready(self) -> snapshot.Snapshot:
        """Wait for the startup work; the connection is kept either way, so close() ends it."""
        if self._startup is None:
            self.start()
        assert self._startup is not None
        self.connection = self._startup.connection()
        snap, self.connection = self._startup.ready()
        return snap

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool | None:
        if session.testsfailed and not session.config.option.continue_on_collection_errors:
            return None  # the default loop reports collection errors
        if session.config.option.collectonly:
            return None
        routed = [it for it in session.items if it.nodeid in self.specs]
        if not routed:
            return None
        local = [it for it in session.items if it.nodeid not in self.specs]
        by_id = {it.nodeid: it for it in routed}
        rootdir = self.config.rootpath
        if self.forced_isolation() is not None:
            self.specs = {n: replace(s, isolation="container") for n, s in self.specs.items()}
        groups = make_groups(routed, self.specs, rootdir, self.options.jobs)
        try:
            snap = self._ready()
            self._check_environment(snap, groups)
        except (
            errors.SandboxError,
            snapshot.SnapshotTooLarge,
            snapshot.EnvironmentProblem,
            OSError,
        ) as exc:
            raise pytest.UsageError(f"sandbox: {exc}") from None
        threads = self._start_pool(snap, groups)
        try:
            self._loop(session, local, by_id, len(groups))
        except BaseException:
            self._abort()
            raise
        finally:
            self._stop.set()
            for _ in threads:
                self._work.put(None)
            if self._runner is not None:
                self._runner.close()
            self._destroy_all()
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
        return True

    def _check_environment(self, snap: snapshot.Snapshot, groups: list[Group]) -> None:
        """Stop at session start, with one message, for what would fail every routed test.

        Building each distinct image now (builds would happen anyway) turns a base image
        with another Python into one message rather than a build error per test.

        Raises:
            EnvironmentProblem: an import from outside what is mirrored, or a wrong Python.
        """
        environment.check_imports(self.config.rootpath)
        if self._runner is None:
            assert self.connection is not None
            self._runner = self._make_runner(self.connection, snap)
        specs = {group.spec.build_key: group.spec for group in groups}
        line = BuildLine(self.config.pluginmanager.get_plugin("terminalreporter"))
        self._runner.images.watch = line.watcher
        try:
            for spec in specs.values():
                try:
                    self._runner.images.get(spec)
                except errors.SandboxError as exc:
                    problem = snapshot.interpreter_problem(str(exc), spec.image)
                    if problem is not None:
                        raise snapshot.EnvironmentProblem(problem) from None
        finally:
            line.finish()
            self._runner.images.watch = None

    def _settings(self, snap: snapshot.Snapshot) -> RunSettings:
        config = self.config
        cwd = (
            snapshot.sandbox_path(config.invocation_params.dir, config.rootpath) or snapshot.PROJECT
        )
        args = ["-p", "no:cacheprovider", "--continue-on-collection-errors", "--junitxml="]
        args += ["--rootdir", snapshot.PROJECT]
        # The environment is mirrored, so a plugin named with -p exists inside too.
        args += worker_args(config.invocation_params.args, plugin_ok=_mirrored)
        if config.pluginmanager.has_plugin("xdist"):
            args += ["-n", "0"]  # the sandbox is the worker: no xdist from addopts inside
        if self.options.debug:
            args += debugging.worker_args(config)
        env = {
            "PYTHONPATH": snap.pythonpath(),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        return RunSettings(
            args=tuple(args),
            cwd=cwd,
            env=env,
            keep_failed=self.options.keep_failed,
            echo_output=config.getoption("capture") == "no",
            drop_unfinished=bool(config.getoption("maxfail")),
            # The same for every session of the project: a daemon's warm pool is keyed by
            # the whole request, labels included, so a per-session value would make every
            # session miss the containers the previous one left warm.
            labels={"pytest-sandbox.session": _project_label(config.rootpath)},
            recycle_after=self._recycle_after(),
            coverage=coverage_spec(config, snapshot.PROJECT),
            debug=self.options.debug,
            post_mortem=self.options.debug and bool(config.getoption("usepdb")),
        )

    def _recycle_after(self) -> int:
        """Raises: pytest.UsageError for a bad `sandbox_recycle` ini value."""
        value = str(self.config.getini("sandbox_recycle")).strip() or "100"
        if not value.isdigit() or int(value) < 1:
            raise pytest.UsageError(f"sandbox_recycle must be a positive integer, not {value!r}")
        return int(value)

    def _make_runner(self, conn: Connection, snap: snapshot.Snapshot) -> GroupRunner:
        from pytest_sandbox.runner import GroupRunner, ImageCache, Registry

        client = conn.client
        return GroupRunner(
            client,
            ImageCache(client, snap),
            self._settings(snap),
            Registry(),
            self._events.put,
            self._stop,
        )

    def _start_pool(self, snap: snapshot.Snapshot, groups: list[Group]) -> list[threading.Thread]:
        assert self.connection is not None
        runner = self._runner
        if runner is None:
            runner = self._runner = self._make_runner(self.connection, snap)
        self._work: queue.Queue[Group | None] = queue.Queue()
        for group in groups:
            self._work.put(group)

        def serve() -> None:
            while not self._stop.is_set():
                group = self._work.get()
                if group is None or self._stop.is_set():
                    return
                runner.run(group)

        threads = [
            threading.Thread(target=serve, name=f"sandbox-{i}", daemon=True)
            for i in range(max(1, min(self.options.jobs, len(groups))))
        ]
        for t in threads:
            t.start()
        return threads

    def _loop(
        self,
        session: pytest.Session,
        local: list[pytest.Item],
        by_id: dict[str, pytest.Item],
        outstanding: int,
    ) -> None:
        for i, item in enumerate(local):
            nextitem = local[i + 1] if i + 1 < len(local) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            if session.shouldfail or session.shouldstop:
                return
            outstanding -= self._drain(session, by_id, block=False)
            if session.shouldfail or session.shouldstop:
                return
        while outstanding > 0:
            outstanding -= self._drain(session, by_id, block=True)
            if session.shouldfail or session.shouldstop:
                return

    def _drain(self, session: pytest.Session, by_id: dict[str, pytest.Item], *, block: bool) -> int:
        """Fire what the pool has finished; returns how many groups completed."""
        finished = 0
        while True:
            try:
                # A short timeout keeps the main thread responsive to Ctrl-C.
                event = self._events.get(timeout=0.2) if block else self._events.get_nowait()
            except queue.Empty:
                if block and finished == 0:
                    continue
                return finished
            block = False
            if isinstance(event, GroupDone):
                finished += 1
            elif isinstance(event, Kept):
                self.kept.append(event)
            elif isinstance(event, DebugRequest) and self.connection is not None:
                debugging.attach(self.config, self.connection.client, event)
            elif isinstance(event, WarningRecord):
                self._warn(event)
            elif isinstance(event, ItemResult):
                self._fire(by_id[event.nodeid], event)
                if session.shouldfail or session.shouldstop:
                    return finished

    def _fire(self, item: pytest.Item, result: ItemResult) -> None:
        config = self.config
        rootdir = str(config.rootpath)
        reports: list[pytest.TestReport] = []
        datas = []
        for data in result.reports:
            rep = config.hook.pytest_report_from_serializable(
                config=config, data=remap_paths(data, rootdir)
            )
            if rep is not None:
                reports.append(rep)
                datas.append(data)
        adopt_subtests(config, reports, datas)
        if result.failure is not None:
            reports += kill_reports(item, reports, result.failure, result.sections)
        spec = self.specs[item.nodeid]
        props: list[tuple[str, object]] = []
        if result.placement is not None:
            props.append(("sandbox_image", result.placement.image_digest))
        props += spec.properties()
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for rep in reports:
            rep.user_properties = [*rep.user_properties, *props]
            ihook.pytest_runtest_logreport(report=rep)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)

    def _warn(self, record: WarningRecord) -> None:
        """Into the host's warnings summary, as xdist's controller forwards a worker's."""
        message = warning_message(record, str(self.config.rootpath))
        self.config.hook.pytest_warning_recorded.call_historic(
            kwargs={
                "warning_message": message,
                "when": "runtest",
                "nodeid": record.nodeid,
                "location": None,
            }
        )

    def _abort(self) -> None:
        """Ctrl-C or an internal error: no sandbox of this session may outlive it."""
        self._stop.set()
        self._destroy_all()

    def _destroy_all(self) -> None:
        if self.connection is not None and self._runner is not None:
            self._runner.registry.destroy_all(self.connection.client)

    def close(self) -> None:
        if self.connection is None and self._startup is not None:
            # The session ended before it needed the service: stop what was started early.
            self.connection = self._startup.connection()
        if self.connection is not None:
            self.connection.close(keep=[k.sandbox_id for k in self.kept])
            self.connection = None

    def report_build_failures(self, terminal: pytest.TerminalReporter) -> None:
        if self._runner is not None:
            self._runner.images.failures.report(terminal)

    def summary_lines(self) -> list[str]:
        return kept_lines(self.kept, service_address(self.options.address, self.options.embedded))
