"""The controller's side of the worker's result channel (see worker.py for the format)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class RecordReader:
    """Splits a byte stream into records framed with this run's nonce.

    Lines without the nonce (a test that somehow reached the channel) and lines
    that do not parse are dropped, never trusted.
    """

    def __init__(self, nonce: str) -> None:
        self._prefix = (nonce + " ").encode()
        self._buf = b""
        self.dropped = 0

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if not line.startswith(self._prefix):
                self.dropped += bool(line.strip())
                continue
            try:
                record = json.loads(line[len(self._prefix) :])
            except ValueError:
                self.dropped += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("t"), str):
                yield record
            else:
                self.dropped += 1


class Tail:
    """The last `limit` bytes of a stream, for crash messages and logs."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        self._limit = limit
        self._data = bytearray()
        self.truncated = False

    def add(self, data: bytes) -> None:
        self._data += data
        if len(self._data) > self._limit:
            del self._data[: len(self._data) - self._limit]
            self.truncated = True

    def text(self) -> str:
        prefix = "[...]\n" if self.truncated else ""
        return prefix + self._data.decode("utf-8", "replace")
