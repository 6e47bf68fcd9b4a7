"""Reaping: sandboxes past their TTL, and labelled containers nobody answers for.

The reaper is given what it needs from the sandbox manager as callables (the live
records, how to destroy one, whether an id is known), so it imports no manager.
`LeftoverRule` is the one rule for what may be removed; the reaper and `sandboxd gc`
both ask it.

A sandbox kept for inspection outlives its instance on purpose. Docker fixes labels at
create time, so the mark is the container's name (`sandbox-ID.kept-until-UNIX`): it is
engine-side, travels with the container, shows in `docker ps`, and every reaper, of
this instance or any other, started now or later, spares the container until then.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sandboxd import instances
from sandboxd.config import ServerConfig
from sandboxd.engine.base import LABEL_EXPIRES, LABEL_INSTANCE, LABEL_SANDBOX, ContainerInfo, Engine
from sandboxd.errors import NotFound, SandboxError
from sandboxd.launcher import container_name
from sandboxd.models import SandboxRecord

log = logging.getLogger(__name__)

#: How long a start waits for leftovers of dead instances to be removed before serving.
STARTUP_REAP_SECONDS = 10.0
#: Our own containers younger than this may not be recorded yet: a create is under way.
FORGOTTEN_AFTER_SECONDS = 120.0
#: Between a kept sandbox's name and the time (unix seconds) it may be reaped.
KEPT_MARK = ".kept-until-"

#: What a pass may take besides the containers of dead instances and expired ones:
#: "orphans" nothing more (periodic passes, `sandboxd gc`); "foreign" also those of other
#: live instances (a start with `reap_foreign`); "all" also kept ones (`sandboxd gc --all`).
Sweep = Literal["orphans", "foreign", "all"]


def kept_name(name: str, until: float) -> str:
    """The name that marks a container as kept for inspection until `until`."""
    return f"{name.partition(KEPT_MARK)[0]}{KEPT_MARK}{until:.0f}"


def kept_until(name: str) -> float | None:
    """When a kept container may go (from its name); None when it is not kept."""
    _, mark, until = name.partition(KEPT_MARK)
    return _float(until) if mark else None


def _unknown(sandbox_id: str) -> bool:
    return False


@dataclass(frozen=True)
class LeftoverRule:
    """What a pass may remove: the one rule of every reaper and of `sandboxd gc`.

    `ours` is the asking instance (none for `sandboxd gc`), whose containers go only when
    forgotten (`known` says no) and old enough that no create is still recording them.
    """

    sweep: Sweep = "orphans"
    ours: str = ""
    known: Callable[[str], bool] = _unknown

    def takes(self, info: ContainerInfo, now: float) -> bool:
        """Whether this labelled container may be removed at `now`."""
        until = kept_until(info.name)
        if until is not None:
            return self.sweep == "all" or until <= now
        owner = info.labels.get(LABEL_INSTANCE, "")
        if owner and owner == self.ours:
            forgotten = not self.known(info.labels.get(LABEL_SANDBOX, ""))
            return forgotten and now - info.created_unix >= FORGOTTEN_AFTER_SECONDS
        if self.sweep != "orphans" or not instances.is_alive(owner):
            return True
        expires = _float(info.labels.get(LABEL_EXPIRES, ""))
        return expires is not None and expires <= now

    def find(self, engine: Engine, now: float) -> list[ContainerInfo]:
        """The engine's labelled containers that this rule takes.

        Raises:
            EngineUnavailable: the engine cannot be reached.
        """
        # Only containers with an instance label are sandboxes: image labels (managed=1
        # included) are inherited by every container made from the image, a build's too.
        return [i for i in engine.list_containers(LABEL_INSTANCE) if self.takes(i, now)]


class Reaper:
    """Removes what expired or was left behind, once at start and then periodically."""

    def __init__(
        self,
        config: ServerConfig,
        engine: Engine,
        *,
        records: Callable[[], list[SandboxRecord]],
        destroy: Callable[[str], None],
        known: Callable[[str], bool],
    ) -> None:
        self.config = config
        self.engine = engine
        self._records = records
        self._destroy = destroy
        self._known = known
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the reaper thread; return once its first pass is done or takes too long."""
        first_pass = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, args=(first_pass,), name="sandbox-reaper", daemon=True
        )
        self._thread.start()
        # Leftovers usually go before the first call is served; but one wedged container
        # in the engine must not keep the service from starting.
        if not first_pass.wait(STARTUP_REAP_SECONDS):
            log.warning("reaping leftovers takes long; serving meanwhile")

    def stop(self) -> None:
        """Stop the periodic passes; a pass under way finishes first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self, first_pass: threading.Event) -> None:
        try:
            self._guarded(lambda: self.reap_orphans(foreign=self.config.reap_foreign))
        finally:
            first_pass.set()
        while not self._stop.wait(self.config.reap_interval_seconds):
            self._guarded(self.reap_expired)
            self._guarded(self.reap_orphans)

    @staticmethod
    def _guarded(step: Callable[[], int]) -> None:
        try:
            step()
        except SandboxError as exc:
            log.warning("reaper: %s", exc)
        except Exception:
            log.exception("reaper failed; will try again")

    def reap_expired(self) -> int:
        """Destroy sandboxes past their time-to-live."""
        now = time.time()
        expired = [r.id for r in self._records() if r.expires_unix <= now]
        for sandbox_id in expired:
            log.info("sandbox %s passed its TTL; destroying", sandbox_id)
            with contextlib.suppress(NotFound):
                self._destroy(sandbox_id)
        return len(expired)

    def reap_orphans(self, *, foreign: bool = False) -> int:
        """Remove labelled containers whose instance is dead, or that outlived their TTL.

        With `foreign`, containers of other live instances go too (config `reap_foreign`,
        for a host where this service is the only one). Kept ones wait for their time.
        """
        removed = 0
        rule = LeftoverRule(
            "foreign" if foreign else "orphans", self.config.instance_id, self._known
        )
        found = rule.find(self.engine, time.time())
        for info in found:
            log.info("reaping %s left by instance %s", info.name, _owner(info))
            with contextlib.suppress(SandboxError):
                self.engine.remove_container(info.id)
                removed += 1
        return removed

    def keep(self, record: SandboxRecord) -> None:
        """Mark a sandbox's container as kept until its TTL, past this instance's end.

        Raises:
            SandboxError: the engine could not rename the container.
        """
        name = kept_name(container_name(record.id), record.expires_unix)
        self.engine.rename_container(record.container_id, name)


def _owner(info: ContainerInfo) -> str:
    return info.labels.get(LABEL_INSTANCE, "") or "?"


def _float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None
