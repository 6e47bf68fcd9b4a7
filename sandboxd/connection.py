"""Reaching sandboxd: a running one at an address, or one embedded in this process.

The CLI and the pytest plugin both start here, so both behave the same way: no
address means an in-process service, stopped (and its sandboxes removed) on close.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

from sandboxd import errors

if TYPE_CHECKING:
    # grpc comes with the client (~0.3 s): a launch imports it off its main thread (the
    # plugin connects in the background while pytest collects), not with this module.
    from sandboxd.channels import TlsCredentials
    from sandboxd.client import SandboxClient
    from sandboxd.config import ServerConfig

    # The whole service (builder, images, engines): only an embedded one needs it, and a
    # client of the daemon would pay ~0.1 s at every launch to import it.
    from sandboxd.server import Embedded

log = logging.getLogger(__name__)


class Connection:
    """A client plus, when we started it, the embedded service behind it."""

    def __init__(self, client: SandboxClient, embedded: Embedded | None = None) -> None:
        self.client = client
        self.embedded = embedded

    def close(self, *, keep: Collection[str] = ()) -> None:
        """Close; an embedded service removes its sandboxes, except those in `keep`."""
        self.client.close()
        if self.embedded is not None:
            try:
                self.embedded.stop(keep=keep)
            except Exception:  # shutting down: report, do not mask the caller's outcome
                log.exception("stopping the embedded sandboxd failed")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _embed(config: ServerConfig | None, address_option: str) -> Embedded:
    from sandboxd.server import start_embedded

    try:
        return start_embedded(config)
    except errors.SandboxError:
        raise
    except Exception as exc:  # a broken install or engine: say so, no traceback
        raise errors.EngineUnavailable(
            f"could not start an embedded sandboxd ({type(exc).__name__}: {exc}); "
            f"start one and pass {address_option}"
        ) from exc


def connect(
    address: str | None,
    *,
    config: ServerConfig | None = None,
    ready_timeout: float = 30.0,
    address_option: str = "--address",
    credentials: TlsCredentials | None = None,
) -> Connection:
    """Connect to `address`, or start an embedded service (with `config`) when it is None.
    `address_option` is the caller's option for an address, named when embedding fails.
    `credentials` (TLS) are for a TCP address; without them the client reads the
    SANDBOXD_TLS_* environment.

    Raises:
        SandboxError: the service cannot be started or reached.
    """
    from sandboxd.client import SandboxClient

    embedded = None
    if not address:
        embedded = _embed(config, address_option)
        address = str(embedded.address)
    client = SandboxClient(address, credentials=None if embedded else credentials)
    try:
        client.wait_ready(timeout=ready_timeout)
    except BaseException:
        client.close()
        if embedded is not None:
            embedded.stop()
        raise
    return Connection(client, embedded)
