"""Verdicts: the one table every layer reads, and turning what was measured about one exec
into a verdict and a sentence for a person.

Adding a verdict is one `VerdictInfo` entry here plus its value in the proto's `Verdict`
enum; tests/unit/test_verdicts.py fails when the two disagree.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from sandboxd.limits import format_size

#: Verdicts where the service stopped the command or the sandbox died: the command's own
#: exit status says nothing about the code under test.
StoppedVerdict = Literal[
    "timed_out",
    "out_of_memory",
    "pids_exhausted",
    "output_truncated",
    "crashed",
]
Verdict = Literal["ok", "nonzero_exit", StoppedVerdict]
#: finished: the command ran to its own end; limit: a limit stopped it; crash: it died.
VerdictKind = Literal["finished", "limit", "crash"]


@dataclass(frozen=True)
class Facts:
    """What a sentence may name: the command's end and the limits it ran under."""

    exit_code: int = 0
    signal: int = 0
    memory_limit: int = 0
    pids_limit: int = 0
    timeout_seconds: float = 0.0
    output_limit: int = 0
    #: Why the command never started, in the engine's terms (empty when it did start).
    start_failure: str = ""


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _ended(f: Facts) -> str:
    if f.start_failure:
        return f"{f.start_failure} (exit code {f.exit_code})"
    if f.signal:
        return f"killed by {signal_name(f.signal)}"
    return f"exited with code {f.exit_code}"


def _crashed(f: Facts) -> str:
    how = f"signal {signal_name(f.signal)}" if f.signal else f"exit code {f.exit_code}"
    return f"sandbox crashed: {how}"


@dataclass(frozen=True)
class VerdictInfo:
    """One verdict, as each layer needs it."""

    name: Verdict
    #: Its number in the proto's `sandbox.v1.Verdict` enum.
    wire: int
    kind: VerdictKind
    #: The sentence for a person, made from what was measured.
    sentence: Callable[[Facts], str]
    #: `sandboxd run` exits with this; None means the command's own exit code.
    cli_exit: int | None = None

    @property
    def limit_kill(self) -> bool:
        return self.kind == "limit"

    @property
    def finished(self) -> bool:
        return self.kind == "finished"


VERDICTS: Mapping[Verdict, VerdictInfo] = {
    v.name: v
    for v in (
        VerdictInfo("ok", 1, "finished", lambda f: "ok"),
        VerdictInfo("nonzero_exit", 2, "finished", _ended),
        VerdictInfo(
            "timed_out", 3, "limit", lambda f: f"timed out after {f.timeout_seconds:.1f}s", 124
        ),
        VerdictInfo(
            "out_of_memory",
            4,
            "limit",
            lambda f: f"out of memory (limit {format_size(f.memory_limit)})",
            137,
        ),
        VerdictInfo(
            "pids_exhausted", 5, "limit", lambda f: f"process limit ({f.pids_limit}) reached"
        ),
        VerdictInfo(
            "output_truncated",
            6,
            "limit",
            lambda f: (
                f"output truncated at {format_size(f.output_limit)} (the command was stopped)"
            ),
        ),
        VerdictInfo("crashed", 7, "crash", _crashed),
    )
}
_BY_WIRE = {v.wire: v for v in VERDICTS.values()}


def by_wire(number: int) -> VerdictInfo | None:
    """The verdict with this proto enum number; None for one this side does not know."""
    return _BY_WIRE.get(number)


@dataclass(frozen=True)
class Observation:
    """Facts gathered while and after a command ran."""

    exit_code: int | None
    timed_out: bool
    timeout_seconds: float
    output_truncated: bool
    output_limit: int
    oom_kills: int
    pids_max_events: int
    container_alive: bool
    memory_limit: int
    pids_limit: int
    start_failure: str = ""


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    exit_code: int
    signal: int
    message: str


def _pick(o: Observation, code: int, sig: int) -> Verdict:
    """The most specific cause wins: a memory kill explains a timeout that follows it, a
    full process table explains a crash."""
    failed = code != 0 or o.timed_out or not o.container_alive
    if o.oom_kills > 0 and (failed or sig == signal.SIGKILL):
        return "out_of_memory"
    if o.pids_max_events > 0 and failed:
        return "pids_exhausted"
    if o.timed_out:
        return "timed_out"
    if o.output_truncated:
        return "output_truncated"
    if not o.container_alive or o.exit_code is None:
        return "crashed"
    return "ok" if code == 0 else "nonzero_exit"


def judge(o: Observation) -> Judgement:
    """The verdict for one exec, with its sentence from the table."""
    code = o.exit_code if o.exit_code is not None else -1
    sig = code - 128 if 128 < code < 160 else 0
    verdict = _pick(o, code, sig)
    facts = Facts(
        exit_code=code,
        signal=sig,
        memory_limit=o.memory_limit,
        pids_limit=o.pids_limit,
        timeout_seconds=o.timeout_seconds,
        output_limit=o.output_limit,
        start_failure=o.start_failure,
    )
    return Judgement(verdict, code, sig, VERDICTS[verdict].sentence(facts))
