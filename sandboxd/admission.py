"""Admission: sandbox slots, the memory budget and per-client caps, with a bounded wait.

Admission counts what it let in (sandboxes being created and live ones alike) and is
told when each goes, so it needs no view of the sandbox registry. Warm containers of
the pool count against the same budget; when a live request needs their memory,
admission evicts them.
"""

from __future__ import annotations

import os
import threading
import time

from sandboxd.config import ServerConfig
from sandboxd.errors import ResourceExhausted
from sandboxd.limits import format_size
from sandboxd.models import Prepared
from sandboxd.pool import WarmPool

#: How long a refused client is told to wait before asking again.
RETRY_AFTER_SECONDS = 5.0
#: The memory budget of a cluster gateway when none is configured: no bound of its own.
CLUSTER_BUDGET = 1 << 60


class Admission:
    """Hands out slots and memory; thread-safe. Every `admit` is matched by one `release`."""

    def __init__(self, config: ServerConfig, pool: WarmPool | None = None) -> None:
        self.slots = config.caps.sandboxes
        self.per_client = config.max_sandboxes_per_client
        self.timeout = config.admission_timeout_seconds
        self.budget = memory_budget(config)
        self._pool = pool
        self._changed = threading.Condition(threading.Lock())
        self._held = 0
        self._memory = 0
        self._by_owner: dict[str, int] = {}
        self._closed = False

    def committed(self) -> int:
        """Memory limits of the admitted sandboxes, live or being created."""
        with self._changed:
            return self._memory

    def free_memory(self) -> int:
        """What the budget leaves after the admitted sandboxes (warm ones not counted)."""
        return self.budget - self.committed()

    def admit(self, owner: str, memory: int, prep: Prepared | None = None) -> None:
        """Wait for a free slot and `memory` bytes of the budget, for a bounded time.

        Raises:
            ResourceExhausted: the client is at its cap, no slot or memory frees within the
                admission timeout, or the request alone is larger than the whole budget.
        """
        if memory > self.budget:
            raise ResourceExhausted(
                f"limits.memory_bytes: {format_size(memory)} is more than this server's whole "
                f"memory budget of {format_size(self.budget)}; ask for less"
            )
        deadline = time.monotonic() + self.timeout
        with self._changed:
            self._check_client(owner)
            while True:
                full = self._held >= self.slots
                committed = self._memory + self._warm_after_eviction(memory, prep)
                if not full and committed + memory <= self.budget:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise ResourceExhausted(
                        f"{self._why(full, committed, memory)}; retry in a few seconds",
                        retry_after=RETRY_AFTER_SECONDS,
                    )
                self._changed.wait(timeout=left)
            self._held += 1
            self._memory += memory
            if owner:
                self._by_owner[owner] = self._by_owner.get(owner, 0) + 1

    def release(self, owner: str, memory: int) -> None:
        """Give back what one `admit` took: its sandbox failed to start or is gone."""
        with self._changed:
            self._held -= 1
            self._memory -= memory
            if owner:
                left = self._by_owner.pop(owner, 1) - 1
                if left:
                    self._by_owner[owner] = left
            # notify_all: a freed slot may fit a smaller request than the first waiter's.
            self._changed.notify_all()

    def close(self) -> None:
        """Refuse waiting and future requests that do not fit right away (shutting down)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _check_client(self, owner: str) -> None:
        held = self._by_owner.get(owner, 0)
        if owner and self.per_client and held >= self.per_client:
            raise ResourceExhausted(
                f"client {owner!r} holds {held} sandboxes, its limit is {self.per_client}; "
                "destroy one first",
                retry_after=RETRY_AFTER_SECONDS,
            )

    def _warm_after_eviction(self, memory: int, prep: Prepared | None) -> int:
        """Memory of the warm containers, after evicting what keeps `memory` from fitting."""
        if self._pool is None:
            return 0
        # Warm containers count; one this request will take moves, not adds.
        warm = self._pool.warm_memory()
        if prep is not None and self._pool.has_ready(prep):
            warm -= memory
        over = self._memory + warm + memory - self.budget
        if over > 0 and warm > 0:
            self._pool.evict(over, keep=prep)
            warm = self._pool.warm_memory()
        return max(0, warm)

    def _why(self, full: bool, committed: int, memory: int) -> str:
        if full:
            return f"all {self.slots} sandbox slots are in use"
        return (
            f"{format_size(committed)} of the {format_size(self.budget)} memory budget is "
            f"committed, {format_size(memory)} more does not fit"
        )


def memory_budget(config: ServerConfig) -> int:
    """The configured memory budget, or the host's physical memory when none is.

    On a cluster the gateway's own memory says nothing: each node's room is reserved by
    placement there, so only a configured budget applies.
    """
    if config.engine == "cluster":
        return config.memory_budget_bytes or CLUSTER_BUDGET
    return config.memory_budget_bytes or _host_memory()


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 62
