"""Turning what was measured about one exec into a verdict and a sentence for a person."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

from sandboxd.limits import format_size

Verdict = Literal[
    "ok",
    "nonzero_exit",
    "timed_out",
    "out_of_memory",
    "pids_exhausted",
    "output_truncated",
    "crashed",
]


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


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    exit_code: int
    signal: int
    message: str


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def judge(o: Observation) -> Judgement:
    """The verdict for one exec. The most specific cause wins: a memory kill explains a
    timeout that follows it, a full process table explains a crash."""
    code = o.exit_code if o.exit_code is not None else -1
    sig = code - 128 if 128 < code < 160 else 0
    failed = code != 0 or o.timed_out or not o.container_alive
    if o.oom_kills > 0 and (failed or sig == signal.SIGKILL):
        return Judgement(
            "out_of_memory", code, sig, f"out of memory (limit {format_size(o.memory_limit)})"
        )
    if o.pids_max_events > 0 and failed:
        return Judgement("pids_exhausted", code, sig, f"process limit ({o.pids_limit}) reached")
    if o.timed_out:
        return Judgement("timed_out", code, sig, f"timed out after {o.timeout_seconds:.1f}s")
    if o.output_truncated:
        return Judgement(
            "output_truncated",
            code,
            sig,
            f"output truncated at {format_size(o.output_limit)} (the command was stopped)",
        )
    if not o.container_alive or o.exit_code is None:
        how = f"signal {signal_name(sig)}" if sig else f"exit code {code}"
        return Judgement("crashed", code, sig, f"sandbox crashed: {how}")
    if code == 0:
        return Judgement("ok", 0, 0, "ok")
    if sig:
        return Judgement("nonzero_exit", code, sig, f"killed by {signal_name(sig)}")
    return Judgement("nonzero_exit", code, 0, f"exited with code {code}")
