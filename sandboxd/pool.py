"""Warm containers, created and started (preload running) before anyone asks for them.

A sandbox handed out is never handed out again: the client destroys it after use
and the pool refills in the background. Each distinct resolved request is its own
pool; it grows by one for every request it could not serve (up to a cap and a
memory budget) and shrinks to zero once nobody has asked for a while.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sandboxd.config import ServerConfig
from sandboxd.models import Prepared, SandboxRecord

log = logging.getLogger(__name__)

#: How long a request waits for a warm container already being made before making its own.
INFLIGHT_WAIT_SECONDS = 1.0
#: How long retiring a request's containers waits for those still being made.
RETIRE_WAIT_SECONDS = 60.0


class WarmPool:
    """Warm containers per resolved request; thread-safe.

    It knows nothing of the sandbox manager: it is given how to launch and discard a
    container and how much of the service-wide memory budget live sandboxes leave.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        launch: Callable[[Prepared], SandboxRecord],
        discard: Callable[[SandboxRecord], None],
        free_memory: Callable[[], int],
        memory_budget: int,
    ) -> None:
        self._launch = launch
        self._discard = discard
        self._free_memory = free_memory
        self.max_per_key = config.pool_max_per_key
        self.memory_budget = config.pool_memory_budget_bytes or memory_budget // 4
        self.idle_seconds = config.pool_idle_seconds
        self._lock = threading.Lock()
        self._filled = threading.Condition(self._lock)
        self._ready: dict[Prepared, deque[SandboxRecord]] = {}
        self._target: dict[Prepared, int] = {}
        self._inflight: dict[Prepared, int] = {}
        self._last_use: dict[Prepared, float] = {}
        self._ids: set[str] = set()
        self._stopped = threading.Event()
        self._fillers = ThreadPoolExecutor(
            max_workers=config.pool_workers, thread_name_prefix="pool-fill"
        )
        self._janitor: threading.Thread | None = None

    # -- what the sandbox manager and admission call ---------------------------------------------

    def take(self, prep: Prepared) -> SandboxRecord | None:
        """A warm sandbox for `prep`, or None. Schedules a replacement."""
        stale: list[SandboxRecord] = []
        record = None
        with self._lock:
            self._last_use[prep] = time.monotonic()
            # One already on its way is usually ready sooner than a new one would be.
            deadline = time.monotonic() + INFLIGHT_WAIT_SECONDS
            while not self._ready.get(prep) and self._inflight.get(prep, 0) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._filled.wait(left)
            ready = self._ready.get(prep)
            while ready:
                candidate = ready.popleft()
                self._ids.discard(candidate.id)
                if candidate.preload is not None and candidate.preload.ended():
                    stale.append(candidate)  # its worker died while waiting
                    continue
                record = candidate
                break
        for dead in stale:
            log.warning("warm sandbox %s lost its preload; discarding", dead.id)
            self._discard(dead)
        if record is not None:
            self._schedule(prep)
        return record

    def missed(self, prep: Prepared) -> None:
        """A request had to wait for a new container: grow this pool by one."""
        with self._lock:
            self._target[prep] = min(self.max_per_key, self._target.get(prep, 0) + 1)
            self._last_use[prep] = time.monotonic()
        self._ensure_janitor()
        self._schedule(prep)

    def has_ready(self, prep: Prepared) -> bool:
        with self._lock:
            return bool(self._ready.get(prep))

    def warm_memory(self) -> int:
        """Memory limits of the warm containers, ready or being made."""
        with self._lock:
            return self._warm_memory()

    def evict(self, needed: int, keep: Prepared | None = None) -> int:
        """Remove ready containers (others' first, oldest pools first) until `needed` bytes
        are free; return how many bytes went. Live sandboxes need the memory more."""
        victims: list[SandboxRecord] = []
        freed = 0
        with self._lock:
            order = sorted(self._ready, key=lambda p: (p == keep, self._last_use.get(p, 0.0)))
            for prep in order:
                queue = self._ready[prep]
                while queue and freed < needed:
                    record = queue.popleft()
                    self._ids.discard(record.id)
                    # Shrink the target too, or the pool would refill right away.
                    self._target[prep] = max(0, self._target.get(prep, 0) - 1)
                    victims.append(record)
                    freed += prep.limits.memory_bytes
        for record in victims:
            self._discard(record)
        if victims:
            log.info("pool: evicted %d warm sandboxes for live ones", len(victims))
        return freed

    def retire(self, match: Callable[[Prepared], bool]) -> list[SandboxRecord]:
        """Stop warming the requests `match` picks and hand back their ready containers, for
        the caller to remove (an image can only be removed once no container uses it)."""
        retired: list[SandboxRecord] = []
        deadline = time.monotonic() + RETIRE_WAIT_SECONDS
        with self._lock:
            for prep in [p for p in self._target if match(p)]:
                self._target[prep] = 0
            # Containers being made now would start on it after all: wait for them (with a
            # zero target they are discarded as they arrive).
            while any(n > 0 for p, n in self._inflight.items() if match(p)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._filled.wait(left)
            for prep in [p for p in self._ready if match(p)]:
                for record in self._ready.pop(prep):
                    self._ids.discard(record.id)
                    retired.append(record)
        return retired

    def knows(self, sandbox_id: str) -> bool:
        with self._lock:
            return sandbox_id in self._ids

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "ready": sum(len(q) for q in self._ready.values()),
                "inflight": sum(self._inflight.values()),
                "target": sum(self._target.values()),
            }

    def stop(self) -> None:
        """Stop filling and remove every warm container."""
        self._stopped.set()
        self._fillers.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            records = [r for q in self._ready.values() for r in q]
            self._ready.clear()
            self._ids.clear()
        for record in records:
            self._discard(record)

    # -- filling and shrinking ----------------------------------------------

    def _warm_memory(self) -> int:
        total = sum(p.limits.memory_bytes * len(q) for p, q in self._ready.items())
        return total + sum(p.limits.memory_bytes * n for p, n in self._inflight.items())

    def _schedule(self, prep: Prepared) -> None:
        # Live sandboxes come first: the pool fills only what the service-wide budget leaves.
        free = self._free_memory()
        with self._lock:
            if self._stopped.is_set():
                return
            have = len(self._ready.get(prep, ())) + self._inflight.get(prep, 0)
            deficit = self._target.get(prep, 0) - have
            room = min(self.memory_budget, free) - self._warm_memory()
            count = max(0, min(deficit, room // max(prep.limits.memory_bytes, 1)))
            self._inflight[prep] = self._inflight.get(prep, 0) + count
        for _ in range(count):
            try:
                self._fillers.submit(self._fill, prep)
            except RuntimeError:  # shut down meanwhile
                with self._lock:
                    self._inflight[prep] -= 1

    def _fill(self, prep: Prepared) -> None:
        try:
            record = self._launch(prep)
        except Exception as exc:
            # Stop warming this key: a failing launch would otherwise retry in a hot loop.
            log.warning("warming a sandbox failed (%s); pool for it stops growing", exc)
            with self._lock:
                self._inflight[prep] -= 1
                self._target[prep] = 0
                self._filled.notify_all()
            return
        with self._lock:
            keep = not self._stopped.is_set() and self._target.get(prep, 0) > 0
            if keep:
                self._ready.setdefault(prep, deque()).append(record)
                self._ids.add(record.id)
                self._inflight[prep] -= 1
                self._filled.notify_all()
        if not keep:
            # Discarded before the fill counts as done: whoever waits for the fills
            # (`retire`) then finds the removal under way.
            self._discard(record)
            with self._lock:
                self._inflight[prep] -= 1
                self._filled.notify_all()

    def _ensure_janitor(self) -> None:
        with self._lock:
            if self._janitor is not None:
                return
            self._janitor = threading.Thread(
                target=self._shrink_loop, name="pool-janitor", daemon=True
            )
        self._janitor.start()

    def _shrink_loop(self) -> None:
        period = max(0.5, min(5.0, self.idle_seconds / 4))
        while not self._stopped.wait(period):
            self.shrink_idle()

    def shrink_idle(self, now: float | None = None) -> int:
        """Empty the pools nobody has asked from for `idle_seconds`; return how many went."""
        now = time.monotonic() if now is None else now
        victims: list[SandboxRecord] = []
        with self._lock:
            for prep, last in list(self._last_use.items()):
                if now - last < self.idle_seconds:
                    continue
                self._target[prep] = 0
                queue = self._ready.pop(prep, deque())
                for record in queue:
                    self._ids.discard(record.id)
                victims.extend(queue)
                if not self._inflight.get(prep):
                    self._last_use.pop(prep, None)
                    self._target.pop(prep, None)
                    self._inflight.pop(prep, None)
        for record in victims:
            self._discard(record)
        if victims:
            log.info("pool: removed %d idle warm sandboxes", len(victims))
        return len(victims)
