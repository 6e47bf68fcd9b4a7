"""Turning a sandbox that did not finish into a message that names the cause."""

from __future__ import annotations

from pytest_sandbox.spec import RouteSpec
from sandboxd.api import ExecResult
from sandboxd.verdicts import VERDICTS, Facts


def describe_kill(
    result: ExecResult | None,
    spec: RouteSpec,
    *,
    error: str = "",
    elapsed: float | None = None,
    watchdog_timeout: float | None = None,
) -> str:
    """Why the worker ended before its last test finished.

    `elapsed` is how long the interrupted test had been running; past its
    timeout, a kill is a timeout whichever layer (worker watchdog, its hard
    backstop, the service's exec deadline) delivered it.
    """
    if watchdog_timeout is not None:
        return f"timed out after {watchdog_timeout:.1f}s"
    if result is None:
        return f"sandbox error: {error or 'the exec ended without a result'}"
    facts = Facts(
        exit_code=result.exit_code,
        signal=result.signal,
        memory_limit=spec.memory,
        pids_limit=spec.pids,
        timeout_seconds=spec.timeout,
    )
    info = result.info
    timed_out = elapsed is not None and elapsed >= spec.timeout
    if info.limit_kill and info.name != "timed_out":
        return result.message or info.sentence(facts)
    if timed_out or info.name == "timed_out":
        return VERDICTS["timed_out"].sentence(facts)
    message = VERDICTS["crashed"].sentence(facts)
    if result.message and result.message not in message:
        message += f" ({result.message})"
    return message
