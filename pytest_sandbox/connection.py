"""Reaching sandboxd: a running one at an address, or an embedded one for the session."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from sandboxd import errors
from sandboxd.client import SandboxClient

log = logging.getLogger(__name__)


class Connection:
    """A client plus, when we started it, the embedded service behind it."""

    def __init__(self, client: SandboxClient, embedded: Any = None) -> None:
        self.client = client
        self.embedded = embedded

    def close(self, *, keep: Collection[str] = ()) -> None:
        """Close; an embedded service removes its sandboxes, except those in `keep`."""
        self.client.close()
        if self.embedded is not None:
            try:
                self.embedded.stop(keep=keep)
            except Exception:  # shutting down: report, do not mask the session's outcome
                log.exception("stopping the embedded sandboxd failed")


def connect(address: str | None, *, ready_timeout: float = 30.0) -> Connection:
    """Connect to `address`, or start an embedded service when it is None.

    Raises:
        SandboxError: the service cannot be started or reached.
    """
    embedded = None
    if not address:
        try:
            from sandboxd.server import start_embedded

            embedded = start_embedded()
        except errors.SandboxError:
            raise
        except Exception as exc:  # a broken install or engine: say so, no traceback
            raise errors.EngineUnavailable(
                f"could not start an embedded sandboxd ({type(exc).__name__}: {exc}); "
                "start one and pass --sandbox-address"
            ) from exc
        address = str(embedded.address)
    client = SandboxClient(address)
    try:
        client.wait_ready(timeout=ready_timeout)
    except BaseException:
        client.close()
        if embedded is not None:
            embedded.stop()
        raise
    return Connection(client, embedded)
