"""Turning a sandbox that did not finish into a message that names the cause."""

from __future__ import annotations

from pytest_sandbox.spec import SandboxSpec
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb


def describe_kill(
    result: pb.ExecResult | None,
    spec: SandboxSpec,
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
    verdict = result.verdict
    if verdict == pb.VERDICT_OUT_OF_MEMORY:
        return result.message or f"out of memory (limit {spec.memory // (1024 * 1024)} MiB)"
    if verdict == pb.VERDICT_PIDS_EXHAUSTED:
        return result.message or f"process limit ({spec.pids}) reached"
    if verdict == pb.VERDICT_OUTPUT_TRUNCATED:
        return result.message or "output limit reached"
    if verdict == pb.VERDICT_TIMED_OUT or (elapsed is not None and elapsed >= spec.timeout):
        return f"timed out after {spec.timeout:.1f}s"
    detail = f"signal {result.signal}" if result.signal else f"exit code {result.exit_code}"
    message = f"sandbox crashed: {detail}"
    if result.message and result.message not in message:
        message += f" ({result.message})"
    return message
