"""A command started in a sandbox, its output already flowing into a queue."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from sandboxd.engine.base import CgroupSample, Engine, ExecProcess

log = logging.getLogger(__name__)

#: Output arrives in chunks of at most this size, so a client sees progress.
CHUNK = 64 * 1024
#: Chunks buffered before the reader blocks (and with it the command's pipe).
QUEUE_CHUNKS = 256

OutputQueue = queue.Queue[tuple[int, bytes] | None]


@dataclass
class Started:
    """A running command: the process, its output queue and the counters at its start."""

    proc: ExecProcess
    events: OutputQueue
    reader: threading.Thread
    before: CgroupSample
    started: float
    finished: threading.Event = field(default_factory=threading.Event)

    def feed(self, data: bytes, *, close: bool = True) -> None:
        """Write stdin in the background (a command may not read it all)."""
        threading.Thread(
            target=_feed, args=(self.proc, data, close), daemon=True, name="exec-stdin"
        ).start()

    def drain(self) -> None:
        """Unblock the reader after a kill so its thread ends."""
        end = time.monotonic() + 5
        while self.reader.is_alive() and time.monotonic() < end:
            with contextlib.suppress(queue.Empty):
                self.events.get(timeout=0.1)

    def ended(self) -> bool:
        """True when the command's output has ended (it exited or was killed)."""
        return self.finished.is_set()


def start(
    engine: Engine,
    container_id: str,
    argv: list[str],
    *,
    env: Mapping[str, str],
    workdir: str,
    user: str,
    stdin: bool,
    tty: bool = False,
    window: tuple[int, int] | None = None,
) -> Started:
    """Sample the cgroup counters, reset the peak, start the command and its reader."""
    before = engine.sample(container_id)
    engine.reset_peak(container_id)
    started = time.monotonic()
    proc = engine.exec(
        container_id, argv, env=env, workdir=workdir, user=user, stdin=stdin, tty=tty, window=window
    )
    events: OutputQueue = queue.Queue(maxsize=QUEUE_CHUNKS)
    finished = threading.Event()
    reader = threading.Thread(
        target=_pump, args=(proc, events, finished), daemon=True, name="exec-reader"
    )
    reader.start()
    return Started(proc, events, reader, before, started, finished)


def _pump(proc: ExecProcess, events: OutputQueue, finished: threading.Event) -> None:
    try:
        for stream, data in proc.output():
            for i in range(0, len(data), CHUNK):
                events.put((stream, data[i : i + CHUNK]))
    except Exception:
        log.debug("exec output ended with an error", exc_info=True)
    finally:
        finished.set()
        events.put(None)


def _feed(proc: ExecProcess, data: bytes, close: bool) -> None:
    try:
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            proc.write_stdin(bytes(view[i : i + CHUNK]))
    except OSError:
        pass  # the command ended before reading all of its input
    finally:
        if close:
            proc.close_stdin()
