"""Reaping: sandboxes past their TTL, and labelled containers nobody answers for.

The reaper is given what it needs from the sandbox manager as callables (the live
records, how to destroy one, whether an id is known), so it imports no manager.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from sandboxd import instances
from sandboxd.config import ServerConfig
from sandboxd.engine.base import LABEL_EXPIRES, LABEL_INSTANCE, LABEL_SANDBOX, ContainerInfo, Engine
from sandboxd.errors import NotFound, SandboxError
from sandboxd.models import SandboxRecord

log = logging.getLogger(__name__)

#: How long a start waits for leftovers of dead instances to be removed before serving.
STARTUP_REAP_SECONDS = 10.0
#: Our own containers younger than this may not be recorded yet: a create is under way.
FORGOTTEN_AFTER_SECONDS = 120.0


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
        for a host where this service is the only one).
        """
        removed = 0
        # Only containers with an instance label are sandboxes: image labels (managed=1
        # included) are inherited by every container made from the image, a build's too.
        for info in self.engine.list_containers(LABEL_INSTANCE):
            if not self._is_orphan(info, time.time(), foreign):
                continue
            with contextlib.suppress(SandboxError):
                self.engine.remove_container(info.id)
                removed += 1
        return removed

    def _is_orphan(self, info: ContainerInfo, now: float, foreign: bool) -> bool:
        owner = info.labels.get(LABEL_INSTANCE, "")
        if owner == self.config.instance_id:
            # Ours but forgotten (a destroy that met a lost engine); the age check keeps
            # us off containers whose create has not recorded them yet.
            known = self._known(info.labels.get(LABEL_SANDBOX, ""))
            return not known and now - info.created_unix >= FORGOTTEN_AFTER_SECONDS
        expires = _float(info.labels.get(LABEL_EXPIRES, ""))
        if not foreign and instances.is_alive(owner) and (expires is None or expires > now):
            return False
        log.info("reaping %s left by instance %s", info.name, owner or "?")
        return True


def _float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None
