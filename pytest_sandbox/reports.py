"""Reports from the sandbox, made native: paths mapped back, limits recorded, kills failed."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import pytest

from pytest_sandbox.models import WarningRecord
from pytest_sandbox.snapshot import PROJECT


class _Writer(Protocol):
    def line(self, s: str = "", **markup: bool) -> None: ...


class _Crash:
    """What the summary line and junitxml read from a failed report's longrepr."""

    def __init__(self, path: str, lineno: int, message: str) -> None:
        self.path = path
        self.lineno = lineno
        self.message = message


class SandboxFailure:
    """The longrepr of a test the sandbox ended: a message, no plugin traceback."""

    def __init__(self, message: str, location: tuple[str, int | None, str]) -> None:
        self.message = message
        self.reprcrash = _Crash(location[0], (location[1] or 0) + 1, message.splitlines()[0])

    def toterminal(self, tw: _Writer) -> None:
        for line in self.message.splitlines():
            tw.line(line, red=True, bold=True)

    def __str__(self) -> str:
        return self.message


def remap_paths(data: Any, rootdir: str) -> Any:
    """Replace the sandbox's project path with the host's rootdir in report paths."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if key == "path" and isinstance(value, str) and value.startswith(PROJECT):
                value = rootdir + value[len(PROJECT) :]
            elif key == "longrepr" and isinstance(value, list) and len(value) == 3:
                # a skip's (path, lineno, reason)
                path = value[0]
                if isinstance(path, str) and path.startswith(PROJECT):
                    path = rootdir + path[len(PROJECT) :]
                # JSON made the tuple a list; the terminal insists on a tuple
                value = (path, value[1], value[2])
            else:
                value = remap_paths(value, rootdir)
            out[key] = value
        return out
    if isinstance(data, list):
        return [remap_paths(v, rootdir) for v in data]
    return data


def kill_reports(
    item: pytest.Item,
    got: Sequence[pytest.TestReport],
    message: str,
    sections: Sequence[tuple[str, str]],
) -> list[pytest.TestReport]:
    """Reports completing an item whose sandbox ended mid-test.

    The phase that was running fails with the message; a teardown report
    follows so the item's report sequence looks like a local failure.
    """
    mains = [r for r in got if type(r) is pytest.TestReport]
    whens = {r.when for r in mains}
    setup_passed = any(r.when == "setup" and r.passed for r in mains)
    if "setup" not in whens:
        phase = "setup"
    elif setup_passed and "call" not in whens:
        phase = "call"
    else:
        phase = "teardown"
    keywords: dict[str, Any] = {k: 1 for k in item.keywords}
    sections = [(name, text.replace(PROJECT, str(item.config.rootpath))) for name, text in sections]
    named = [
        (f"{name} {phase}" if name.startswith("Captured") else name, text)
        for name, text in sections
    ]
    out = [
        pytest.TestReport(
            item.nodeid,
            item.location,
            keywords,
            "failed",
            SandboxFailure(message, item.location),  # type: ignore[arg-type]
            phase,  # type: ignore[arg-type]
            named,
        )
    ]
    if phase != "teardown":
        out.append(
            pytest.TestReport(item.nodeid, item.location, keywords, "passed", None, "teardown")
        )
    return out


def adopt_subtests(config: pytest.Config, reports: Sequence[Any], datas: Sequence[Any]) -> None:
    """Give replayed subtest reports what a local run would have.

    pytest's subtests count failures in the worker's config stash, and the top-level
    test is failed by the terminal's status hook from that count: the host needs the
    count too. Its context kwargs are already reprs; deserializing repr's them again.
    """
    try:
        from _pytest.subtests import SubtestReport, failed_subtests_key
    except ImportError:  # pytest without built-in subtests
        return
    top = next((r for r in reports if r.when == "call" and not isinstance(r, SubtestReport)), None)
    for report, data in zip(reports, datas, strict=True):
        if not isinstance(report, SubtestReport):
            continue
        context = data.get("_subtest.context") if isinstance(data, dict) else None
        if isinstance(context, dict) and isinstance(context.get("kwargs"), dict):
            object.__setattr__(report.context, "kwargs", dict(context["kwargs"]))
        if report.failed and top is not None:
            config.stash[failed_subtests_key][top.id] += 1


def warning_message(record: WarningRecord, rootdir: str) -> warnings.WarningMessage:
    """The host's WarningMessage for a warning raised inside, as xdist rebuilds them: the
    category itself when its module is loaded here (never imported on the word of the
    sandbox), else UserWarning naming it."""
    module, _, name = record.category.rpartition(".")
    category: type[Warning] = UserWarning
    text = f"{record.category}: {record.message}"
    found = getattr(sys.modules.get(module or "builtins"), name, None)
    if isinstance(found, type) and issubclass(found, Warning):
        category, text = found, record.message
    filename = record.filename
    if filename.startswith(PROJECT):
        filename = rootdir + filename[len(PROJECT) :]
    try:
        message: Warning = category(text)
    except Exception:  # a category whose constructor wants other arguments
        category, message = UserWarning, UserWarning(f"{record.category}: {record.message}")
    return warnings.WarningMessage(message, category, filename, record.lineno)
