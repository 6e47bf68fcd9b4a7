"""What the session's summary says about sandboxes kept for inspection."""

from __future__ import annotations

from collections.abc import Sequence

from pytest_sandbox.models import Kept
from sandboxd import daemon


def service_address(address: str | None, embedded: bool) -> str | None:
    """Where the session's service answers after the session: the address given, else
    the local daemon's socket; None when it was embedded (and ended with the session)."""
    if address:
        return address
    if embedded or daemon.embedded_by_default():
        return None
    return daemon.default_paths().address


def kept_lines(kept: Sequence[Kept], address: str | None) -> list[str]:
    """A line per kept sandbox telling how to get into it, and how long it stays.

    With a service that outlives the session (the local daemon, an address) the way in is
    `sandboxd shell` through that service, which works wherever it runs; an embedded
    service is gone by now, so only the engine's own `docker exec` is left.
    """
    lines = []
    for box in kept:
        lines.append(f"kept the sandbox of {', '.join(box.nodeids)}:")
        if address:
            lines.append(f"    sandboxd shell --address {address} {box.sandbox_id}")
        else:
            lines.append(f"    docker exec -it {box.container_id} bash")
    if lines and address:
        lines.append(
            "(kept until the service ends it: its TTL, a few minutes past the tests' timeout)"
        )
    elif lines:
        lines.append(
            "(kept until its TTL, a few minutes past the tests' timeout, or `sandboxd gc "
            "--all`; through the local daemon or --sandbox-address, a `sandboxd shell` line)"
        )
    return lines
