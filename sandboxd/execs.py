"""Running commands in sandboxes: deadlines, output caps, measurements, file transfer."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from sandboxd import processes
from sandboxd.api import ExecOutcome, ExecRequest, Output
from sandboxd.engine.base import CgroupSample
from sandboxd.errors import (
    EngineUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SandboxError,
)
from sandboxd.models import SandboxRecord
from sandboxd.sandboxes import SandboxManager, check_env
from sandboxd.verdicts import Observation, judge

log = logging.getLogger(__name__)

MAX_ARGV_BYTES = 256 * 1024
MAX_STDIN = 32 * 1024 * 1024


def _peak(after: CgroupSample, verdict: str, memory_limit: int) -> int:
    """Peak memory; for a memory kill that took the container's cgroup with it (gVisor's
    sandbox process, or the container's init), the limit: the kernel kills only there."""
    peak = after.memory_peak_bytes or 0
    if verdict == "out_of_memory" and peak == 0:
        return memory_limit
    return peak


def check_exec(req: ExecRequest, record: SandboxRecord) -> tuple[float, int]:
    """(timeout, output limit) for this exec within the sandbox's limits.

    Raises:
        InvalidArgument: empty argv, NUL bytes, oversized input, limits above the sandbox's.
    """
    if req.attach_preload:
        if req.argv:
            raise InvalidArgument("argv: leave it empty when attaching to the preloaded command")
    elif not req.argv or not req.argv[0]:
        raise InvalidArgument("argv: give the command to run")
    if any("\x00" in a for a in req.argv):
        raise InvalidArgument("argv: arguments cannot contain NUL bytes")
    if sum(len(a) for a in req.argv) > MAX_ARGV_BYTES:
        raise InvalidArgument(f"argv: above the limit of {MAX_ARGV_BYTES} bytes")
    if len(req.stdin) > MAX_STDIN:
        raise InvalidArgument(f"stdin: above the limit of {MAX_STDIN} bytes (use PutFiles)")
    check_env(req.env)
    limits = record.limits
    timeout = req.timeout_seconds or limits.timeout_seconds
    if not (timeout > 0) or timeout == float("inf"):
        raise InvalidArgument(
            f"timeout_seconds: must be a positive number, got {req.timeout_seconds!r}"
        )
    if timeout > limits.timeout_seconds:
        raise InvalidArgument(
            f"timeout_seconds: {timeout:g} is above this sandbox's limit of "
            f"{limits.timeout_seconds:g}s"
        )
    output = req.output_limit_bytes or limits.output_bytes
    if output < 0 or output > limits.output_bytes:
        raise InvalidArgument(
            f"output_limit_bytes: {output} must be between 1 and this sandbox's limit of "
            f"{limits.output_bytes}"
        )
    if req.workdir and (not req.workdir.startswith("/") or ".." in req.workdir.split("/")):
        raise InvalidArgument("workdir: must be an absolute path without '..'")
    return timeout, output


class Executor:
    """Runs commands in the manager's sandboxes."""

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self.engine = manager.engine

    def run(
        self,
        sandbox_id: str,
        req: ExecRequest,
        owner: str = "",
        cancelled: threading.Event | None = None,
    ) -> Iterator[Output | ExecOutcome]:
        """Yield output as it comes, then one ExecOutcome. Closing the generator kills the command.

        Raises:
            NotFound, PermissionDenied, InvalidArgument, FailedPrecondition, EngineUnavailable.
        """
        record = self.manager.get(sandbox_id, owner)
        timeout, output_limit = check_exec(req, record)
        return self.run_record(record, req, timeout, output_limit, cancelled)

    def run_record(
        self,
        record: SandboxRecord,
        req: ExecRequest,
        timeout: float,
        output_limit: int,
        cancelled: threading.Event | None = None,
        on_start: Callable[[processes.Started], None] | None = None,
    ) -> Iterator[Output | ExecOutcome]:
        """`run` for a record whose request was already checked (or is the service's own).
        `on_start` is handed the running command (an interactive exec feeds it)."""
        run, cpu_before, started = self._begin(record, req)
        if on_start is not None:
            on_start(run)
        tally = _Tally(deadline=started + timeout, output_limit=output_limit)
        try:
            yield from self._stream(record, run, tally, cancelled)
        finally:
            if not tally.finished:
                run.proc.kill()
                run.drain()
            run.proc.close()
        if tally.cancelled:
            return
        wall = time.monotonic() - started
        exit_code = run.proc.exit_code()
        after = self.engine.sample(record.container_id)
        judgement = judge(
            Observation(
                exit_code=exit_code,
                timed_out=tally.timed_out,
                timeout_seconds=timeout,
                output_truncated=tally.truncated,
                output_limit=output_limit,
                oom_kills=_delta(run.before.oom_kills, after.oom_kills),
                pids_max_events=_delta(run.before.pids_max_events, after.pids_max_events),
                container_alive=self._alive_after(record, exit_code, tally),
                memory_limit=record.limits.memory_bytes,
                pids_limit=record.limits.pids,
                start_failure=run.proc.start_failure() or "",
            )
        )
        if judgement.verdict == "crashed":
            if record.state == "destroyed":
                # Not a crash the command caused: a caller destroyed the sandbox under it.
                message = "the sandbox was destroyed while the command ran"
                judgement = replace(judgement, message=message)
            else:
                record.state = "exited"
        yield ExecOutcome(
            judgement=judgement,
            wall_seconds=wall,
            cpu_seconds=_cpu_seconds(cpu_before, after),
            peak_memory_bytes=_peak(after, judgement.verdict, record.limits.memory_bytes),
            output_truncated=tally.truncated,
            stdout_bytes=tally.sizes[1],
            stderr_bytes=tally.sizes[2],
        )

    def _begin(
        self, record: SandboxRecord, req: ExecRequest
    ) -> tuple[processes.Started, CgroupSample, float]:
        """The running command, the counters CPU time counts from, and when it started.

        Raises:
            FailedPrecondition: the sandbox stopped, or has no preload to attach to.
        """
        if not req.attach_preload:
            run = self._start(record, req)
            if req.stdin:
                run.feed(req.stdin)
            return run, run.before, run.started
        run = self.manager.take_preload(record)
        # Counters for the verdict stay from the preload's start (a memory kill while it
        # waited still counts); CPU and wall time count from the attach.
        cpu_before = self.engine.sample(record.container_id)
        self.engine.reset_peak(record.container_id)
        started = time.monotonic()
        run.feed(req.stdin)  # closing stdin tells a waiting command its input is complete
        return run, cpu_before, started

    def _start(self, record: SandboxRecord, req: ExecRequest) -> processes.Started:
        try:
            return processes.start(
                self.engine,
                record.container_id,
                req.argv,
                env=req.env,
                workdir=req.workdir or record.workdir,
                user=record.user,
                stdin=bool(req.stdin) or req.stream_stdin,
                tty=req.tty,
                window=req.window,
            )
        except NotFound:
            raise FailedPrecondition(f"sandbox {record.id} is no longer running") from None
        except EngineUnavailable:
            raise
        except SandboxError:
            # The engine refuses execs into a stopped container with a conflict, not a 404.
            if self.manager.alive(record):
                raise
            record.state = "exited"
            raise FailedPrecondition(
                f"sandbox {record.id} is no longer running (its container stopped)"
            ) from None

    def _stream(
        self,
        record: SandboxRecord,
        run: processes.Started,
        tally: _Tally,
        cancelled: threading.Event | None,
    ) -> Iterator[Output]:
        """Pass output on until the command ends, its deadline passes or its output cap is
        reached (then it is killed); `tally` records which."""
        next_check = time.monotonic() + 1.0
        while True:
            left = tally.deadline - time.monotonic()
            if left <= 0:
                tally.timed_out = True
                run.proc.kill()
                return
            if cancelled is not None and cancelled.is_set():
                tally.cancelled = True
                run.proc.kill()
                return
            try:
                item = run.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                # A container that died as a whole (gVisor's sandbox killed for memory)
                # can leave the exec's stream open for many seconds: look, now and then.
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    if not self.manager.alive(record):
                        run.proc.close()  # unblocks the reader, so the drain is quick
                        return
                continue
            if item is None:
                tally.finished = True
                return
            data = tally.take(*item)
            if data:
                yield Output(item[0], data)
            if tally.truncated:
                run.proc.kill()
                return

    def _alive_after(self, record: SandboxRecord, exit_code: int | None, tally: _Tally) -> bool:
        """Whether the container outlived the command (if not, the command did not fail)."""
        # A command that exited on its own says its container was alive: asking the engine
        # costs a call per exec, so ask only when the end looks like a kill.
        if exit_code is not None and 0 <= exit_code < 128:
            return True
        alive = self.manager.alive(record)
        if alive and exit_code == 128 + 9 and not (tally.timed_out or tally.truncated):
            # A container killed from outside takes its execs down a moment before the
            # engine reports it stopped; look again before calling this a plain SIGKILL.
            for _ in range(10):
                time.sleep(0.1)
                alive = self.manager.alive(record)
                if not alive:
                    break
        return alive


@dataclass
class _Tally:
    """What one exec's output loop saw: how much went out and why it stopped."""

    deadline: float
    output_limit: int
    sizes: dict[int, int] = field(default_factory=lambda: {1: 0, 2: 0})
    timed_out: bool = False
    truncated: bool = False
    finished: bool = False
    cancelled: bool = False

    def take(self, stream: int, data: bytes) -> bytes:
        """The part of `data` that fits under the output cap; past it, `truncated` is set."""
        room = self.output_limit - self.sizes[1] - self.sizes[2]
        if len(data) > room:
            data = data[: max(room, 0)]
            self.truncated = True
        self.sizes[stream] += len(data)
        return data


def _delta(before: int | None, after: int | None) -> int:
    if before is None or after is None:
        return 0
    return max(0, after - before)


def _cpu_seconds(before: CgroupSample, after: CgroupSample) -> float:
    if before.cpu_ns is None or after.cpu_ns is None:
        return 0.0
    return max(0, after.cpu_ns - before.cpu_ns) / 1e9
