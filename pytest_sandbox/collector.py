"""One worker run's records, turned into results: one method per record kind.

The shape of pytest-xdist's DSession (`worker_<event>` methods): the exec's
output feeds the collector on a pool thread, and each framed record goes to
the method named after its kind. Once the exec has ended, `settle`
decides what the end means for the test in progress and for those the worker
never reached. Results go to the main thread through `emit`, never fired here.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_sandbox.models import DebugRequest, ItemResult, Placement, RunSettings
from pytest_sandbox.outcome import timeout_message
from pytest_sandbox.records import RecordReader, Tail

log = logging.getLogger(__name__)

Record = dict[str, Any]
#: Sections with what a killed test printed, given the worker's timeout record (if any).
Recover = Callable[[Mapping[str, Any] | None], list[tuple[str, str]]]
SANDBOX_LOG = "Captured sandbox log"


def timeout_sections(timeout: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What a timed-out test printed and where it was, from the worker's timeout record."""
    sections = [(f"Captured {k}", str(timeout.get(k, ""))) for k in ("stdout", "stderr")]
    sections = [(name, text) for name, text in sections if text]
    if timeout.get("stack"):
        sections.append(("Stack of the test when it timed out", str(timeout["stack"])))
    return sections


@dataclass(frozen=True)
class Running:
    """The test the worker has started and not yet finished."""

    nodeid: str
    since: float  # time.monotonic() at its start record
    reports: list[dict[str, Any]] = field(default_factory=list)


class Collector:
    """The results of one worker run over `pending`, in one sandbox."""

    def __init__(
        self,
        nonce: str,
        pending: list[str],
        placement: Placement,
        settings: RunSettings,
        emit: Callable[[object], None],
    ) -> None:
        self.pending = list(pending)
        self.placement = placement
        self.settings = settings
        self.emit = emit
        self.reader = RecordReader(nonce)
        self.stderr = Tail()
        self.done: set[str] = set()
        self.failed: list[str] = []
        self.held: list[ItemResult] = []  # with --sandbox-keep-failed, results wait for the logs
        self.running: Running | None = None
        self.timeout: Record | None = None  # the worker's watchdog fired
        self.exited = False  # the worker reached its end on its own
        self.recycled = ""  # isolation="fork": why the worker gave its sandbox back early
        self.missing: list[str] = []
        self.collect_errors: list[object] = []

    def feed(self, data: bytes) -> None:
        """The worker's stdout: framed records, each to the method named after its kind."""
        for record in self.reader.feed(data):
            handler = getattr(self, f"worker_{record['t']}", None)
            if handler is None:
                log.debug("ignoring a worker record of kind %r", record["t"])
            else:
                handler(record)

    def log(self, data: bytes) -> None:
        """The worker's stderr: kept for crash messages, echoed live with -s."""
        self.stderr.add(data)
        if self.settings.echo_output:
            sys.stderr.write(data.decode("utf-8", "replace"))

    # -- one method per record kind (see worker.py for the format) -------------

    def worker_start(self, record: Record) -> None:
        self.running = Running(record["nodeid"], time.monotonic())

    def worker_report(self, record: Record) -> None:
        if self.running is not None:
            self.running.reports.append(record["report"])

    def worker_finish(self, record: Record) -> None:
        running = self.running
        if running is None or running.nodeid != record["nodeid"]:
            return
        self.done.add(running.nodeid)
        timeout, self.timeout = self.timeout, None
        if timeout is not None and timeout.get("nodeid") == running.nodeid:
            # isolation="fork": the watchdog ended the test's child, the worker lives on.
            log_text = self.stderr.text()
            sections = timeout_sections(timeout) + ([(SANDBOX_LOG, log_text)] if log_text else [])
            message = timeout_message(float(timeout["seconds"]))
            self._post(
                ItemResult(running.nodeid, running.reports, self.placement, message, sections)
            )
        else:
            self._post(ItemResult(running.nodeid, running.reports, self.placement))
        self.running = None

    def worker_missing(self, record: Record) -> None:
        self.missing = list(record["nodeids"])

    def worker_collect(self, record: Record) -> None:
        self.collect_errors.append(record["report"].get("longrepr"))

    def worker_timeout(self, record: Record) -> None:
        self.timeout = record

    def worker_exit(self, record: Record) -> None:
        self.exited = True

    def worker_recycle(self, record: Record) -> None:
        self.recycled = str(record.get("reason") or "recycled")
        log.debug("sandbox %s recycled: %s", self.placement.sandbox_id, self.recycled)

    def worker_debug(self, record: Record) -> None:
        self.emit(
            DebugRequest(
                self.placement.sandbox_id,
                str(record.get("nodeid", "")),
                int(record["pid"]),
                str(record["file"]),
            )
        )

    def worker_error(self, record: Record) -> None:
        self.stderr.add(str(record.get("text", "")).encode())

    # -- after the exec ----------------------------------------------------------

    def elapsed(self) -> float | None:
        """How long the test in progress has been running, None between tests."""
        return time.monotonic() - self.running.since if self.running else None

    def watchdog_seconds(self) -> float | None:
        """The timeout the worker's own watchdog enforced, None if it did not fire."""
        return float(self.timeout["seconds"]) if self.timeout else None

    def settle(self, kill_message: str, recover: Recover) -> tuple[list[str], list[str]]:
        """Post what is still owed; returns (tests to run in a fresh sandbox, tests that failed).

        `kill_message` names the cause if the worker did not reach its end on its own.
        """
        self._fail_missing()
        if self.exited:
            self._fail_unreached()
            left: list[str] = []
        elif self.recycled and self.running is None:
            left = [n for n in self.pending if n not in self.done]
        else:
            left = self._after_kill(kill_message, recover)
        self._release_held()
        return left, self.failed

    def _post(self, result: ItemResult) -> None:
        if result.failure or any(r.get("outcome") == "failed" for r in result.reports):
            self.failed.append(result.nodeid)
        if self.settings.keep_failed:
            self.held.append(result)
        else:
            self.emit(result)

    def _fail(self, nodeid: str, message: str) -> None:
        self._post(ItemResult(nodeid, [], self.placement, failure=message))

    def _fail_missing(self) -> None:
        """Tests the worker's pytest did not collect fail with its collection errors."""
        missing = [n for n in self.missing if n not in self.done]
        if not missing:
            return
        why = "\n".join(str(c) for c in self.collect_errors if c) or "no such test there"
        for nodeid in missing:
            self._fail(nodeid, f"not collected in the sandbox:\n{why}")
            self.done.add(nodeid)

    def _fail_unreached(self) -> None:
        """The worker ended on its own before some tests: expected only with -x/--maxfail."""
        if self.settings.drop_unfinished:
            return
        for nodeid in self.pending:
            if nodeid not in self.done:
                self._fail(nodeid, "the sandbox worker did not run it")

    def _after_kill(self, message: str, recover: Recover) -> list[str]:
        """The worker was killed: the test in progress fails with the cause, the rest retry."""
        running, timeout = self.running, self.timeout
        left = [
            n
            for n in self.pending
            if n not in self.done and (running is None or n != running.nodeid)
        ]
        killed = running.nodeid if running else (timeout or {}).get("nodeid")
        if killed:
            log_text = self.stderr.text()
            sections = recover(timeout) + ([(SANDBOX_LOG, log_text)] if log_text else [])
            reports = list(running.reports) if running else []
            self._post(ItemResult(killed, reports, self.placement, message, sections))
            return left
        if not self.done:  # no progress at all: a retry would fail the same way
            tail = self.stderr.text().strip()
            for nodeid in left:
                self._fail(nodeid, f"{message}\n{tail}".strip())
            return []
        return left

    def _release_held(self) -> None:
        """With --sandbox-keep-failed: failed results carry the sandbox's log, then go."""
        tail = self.stderr.text().strip()
        for result in self.held:
            if result.nodeid in self.failed and tail:
                result.sections.append((SANDBOX_LOG, tail))
            self.emit(result)
