"""The plain records passed between the controller, its pool threads and the collector.

Pool threads post ItemResult, Kept, DebugRequest and GroupDone to the main thread; nothing
here holds a pytest object, so the records cross threads safely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_sandbox.coverage_data import CoverageSpec
from pytest_sandbox.spec import RouteSpec


@dataclass(frozen=True)
class Group:
    """Tests that share one sandbox at a time, in collection order."""

    spec: RouteSpec
    nodeids: tuple[str, ...]
    files: tuple[str, ...]  # rootdir-relative paths handed to the worker's pytest


@dataclass(frozen=True)
class RunSettings:
    args: tuple[str, ...]  # the worker's pytest arguments, before the files
    cwd: str
    env: Mapping[str, str]
    keep_failed: bool = False
    echo_output: bool = False  # -s: show the sandbox's live output
    drop_unfinished: bool = False  # -x/--maxfail: a worker stopping early is expected
    labels: Mapping[str, str] = field(default_factory=dict)
    recycle_after: int = 100  # isolation="fork": tests per container before a fresh one
    coverage: CoverageSpec | None = None  # pytest-cov measures on the host: measure inside
    debug: bool = False  # a terminal to debug on: pdb (breakpoint(), --pdb) reaches it
    post_mortem: bool = False  # --pdb with a terminal: the exec may run to the server's cap


@dataclass(frozen=True)
class Placement:
    """Where a test ran: recorded on its reports."""

    sandbox_id: str
    container_id: str
    image_digest: str


@dataclass
class ItemResult:
    nodeid: str
    reports: list[dict[str, Any]]
    placement: Placement | None
    failure: str | None = None  # why the sandbox could not finish the test
    sections: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Kept:
    container_id: str
    nodeids: tuple[str, ...]
    sandbox_id: str = ""


@dataclass(frozen=True)
class DebugRequest:
    """A debugger in a sandbox wants the user's terminal (see debugger.py)."""

    sandbox_id: str
    nodeid: str
    pid: int
    file: str  # where the terminal's device path is to be written


@dataclass(frozen=True)
class GroupDone:
    group: Group
