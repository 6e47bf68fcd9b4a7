"""Which environment images earlier sessions built, so a session need not read the
environment again.

Mirroring the environment means reading every installed file (hundreds of megabytes
in a large virtualenv) only to learn that the service has those images already. A
session keeps, per (environment fingerprint, first image of the chain, fragment), the
tag of the last image of the environment's chain; the next session with the same fingerprint
builds the project's image straight on it, and falls back to the full chain when the
service no longer has it (another engine, `sandboxd gc --images`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MAX_ENTRIES = 64
#: Changes with the recipe of the environment's images (snapshot.Snapshot.environment), so
#: that a session does not build on an image an earlier recipe made.
RECIPE = "2"


def default_path() -> Path:
    """`$XDG_CACHE_HOME/sandbox/environments.json`, else under ~/.cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sandbox" / "environments.json"


def reuse_key(fingerprint: str, image: str, fragment: str) -> str:
    """`image` is the tag of the chain's first image: the base the service resolved, not
    the name a marker gives (the service's default differs from one service to another)."""
    return hashlib.sha256(f"{RECIPE}\0{fingerprint}\0{image}\0{fragment}".encode()).hexdigest()


class BuiltEnvironments:
    """The small JSON file of {reuse key: image tag}; unreadable means empty."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return (
            {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
        )

    def get(self, key: str) -> str | None:
        return self._read().get(key)

    def put(self, key: str, tag: str) -> None:
        """Record `tag`; a failure to write only costs the next session a full read."""
        entries = self._read()
        entries.pop(key, None)
        entries[key] = tag
        kept = dict(list(entries.items())[-MAX_ENTRIES:])
        tmp = ""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".environments-")
            with os.fdopen(fd, "w") as f:
                json.dump(kept, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.debug("could not record the environment image: %s", exc)
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
