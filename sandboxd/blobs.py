"""A content-addressed blob store for build context, in the style of REAPI's CAS.

Build context no longer has to fit one gRPC message: a client asks which blobs the
service lacks, streams only those in chunks, then builds naming files by digest. Blobs
live on disk under the service's state dir, one file per SHA-256, within a size budget;
the least recently used go first when a new blob needs room. The directory belongs to
one service instance: removed at stop, and removed at the next start if it crashed.

Between tenants a digest is not a secret: a blob counts as present for a client only once
that client uploaded it itself, so knowing a file's SHA-256 gives neither its content nor an
image built from it. The operator (no owner) sees every blob.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sandboxd import instances
from sandboxd.errors import InvalidArgument, ResourceExhausted

#: Bytes the store keeps on disk before evicting least-recently-used blobs.
DEFAULT_BUDGET = 4 * 1024**3
#: Bytes one UploadBlobs call may carry; a client splits larger uploads into calls.
MAX_UPLOAD = 1024**3
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BlobDigest:
    """What names a blob: its hex SHA-256 and its size, checked together on arrival."""

    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class UploadPart:
    """One message of an upload: `digest` starts a blob, `data` continues the current one."""

    digest: BlobDigest | None
    data: bytes


def check_digest(digest: BlobDigest) -> BlobDigest:
    """Raises:
    InvalidArgument: not a hex SHA-256 or a negative size.
    """
    if not _SHA256.match(digest.sha256):
        raise InvalidArgument(f"blob digest: {digest.sha256[:80]!r} is not a hex SHA-256")
    if digest.size_bytes < 0:
        raise InvalidArgument(f"blob {digest.sha256[:12]}: size {digest.size_bytes} is negative")
    return digest


class BlobStore:
    """Blobs on disk, one file per digest, least recently used evicted past the budget."""

    def __init__(self, root: Path, budget: int = DEFAULT_BUDGET, max_upload: int = MAX_UPLOAD):
        self.root = root
        self.budget = budget
        self.max_upload = max_upload
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # sha256 -> size, oldest use first
        self._holders: dict[str, set[str]] = {}  # sha256 -> the clients that uploaded it
        self._total = 0
        #: Bytes received by uploads since the store was made, kept or not (for measurements).
        self.received_bytes = 0

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def start(self) -> None:
        """Begin empty. The root is named after the instance id: what a crashed run of this
        instance, or of any instance no longer alive, left beside it is removed."""
        self.stop()
        self.root.mkdir(parents=True, mode=0o700)
        for sibling in self.root.parent.iterdir():
            if sibling != self.root and sibling.is_dir() and not instances.is_alive(sibling.name):
                shutil.rmtree(sibling, ignore_errors=True)

    def stop(self) -> None:
        """Remove every blob and the directory itself."""
        with self._lock:
            self._index.clear()
            self._holders.clear()
            self._total = 0
        shutil.rmtree(self.root, ignore_errors=True)

    def _held(self, sha256: str, owner: str) -> bool:
        """Whether `owner` may read the blob: it uploaded it (the operator reads all).
        Called with the lock held."""
        return sha256 in self._index and (not owner or owner in self._holders.get(sha256, ()))

    def missing(self, digests: Iterable[BlobDigest], owner: str = "") -> list[BlobDigest]:
        """The digests the store lacks for `owner`; the ones it has count as used (they are
        about to be)."""
        out = []
        with self._lock:
            for d in digests:
                check_digest(d)
                if self._index.get(d.sha256) == d.size_bytes and self._held(d.sha256, owner):
                    self._index.move_to_end(d.sha256)
                elif d not in out:
                    out.append(d)
        return out

    def read(self, sha256: str, owner: str = "") -> bytes | None:
        """A blob's content, or None when the store does not have it for `owner` (never
        uploaded by it, or evicted)."""
        with self._lock:
            if not self._held(sha256, owner):
                return None
            self._index.move_to_end(sha256)
        try:
            return (self.root / sha256).read_bytes()
        except FileNotFoundError:  # evicted between the look-up and the read
            return None

    def holds(self, sha256: str, owner: str = "") -> bool:
        """Whether `owner` uploaded this blob and the store still has it."""
        with self._lock:
            return self._held(sha256, owner)

    def upload(self, parts: Iterator[UploadPart], owner: str = "") -> tuple[int, int]:
        """Store the blobs of one upload stream for `owner`; return (blobs, bytes) received.

        Raises:
            InvalidArgument: data before any digest, or content not matching its digest/size.
            ResourceExhausted: the call is past `max_upload` bytes, or a blob cannot fit
                the budget.
        """
        blobs = received = 0
        current: tuple[BlobDigest, Path, hashlib._Hash, int] | None = None
        handle = None
        try:
            for part in parts:
                if part.digest is not None:
                    if current is not None and handle is not None:
                        handle.close()
                        self._commit(current, owner)
                        blobs += 1
                    digest = self._admit(check_digest(part.digest), received)
                    fd, name = tempfile.mkstemp(prefix=".upload-", dir=self.root)
                    handle = os.fdopen(fd, "wb")
                    current = (digest, Path(name), hashlib.sha256(), 0)
                elif current is None or handle is None:
                    raise InvalidArgument("UploadBlobs: data before the first blob digest")
                if part.data:
                    digest, path, h, size = current
                    size += len(part.data)
                    received += len(part.data)
                    with self._lock:
                        self.received_bytes += len(part.data)
                    if size > digest.size_bytes:
                        raise InvalidArgument(
                            f"blob {digest.sha256[:12]}: more than its {digest.size_bytes} bytes"
                        )
                    h.update(part.data)
                    handle.write(part.data)
                    current = (digest, path, h, size)
            if current is not None and handle is not None:
                handle.close()
                self._commit(current, owner)
                blobs += 1
                current = None
        finally:
            if handle is not None:
                handle.close()
            if current is not None:
                with contextlib.suppress(FileNotFoundError):
                    current[1].unlink()
        return blobs, received

    def _admit(self, digest: BlobDigest, received: int) -> BlobDigest:
        """Refuse a blob the call's cap or the store's budget cannot hold."""
        if received + digest.size_bytes > self.max_upload:
            raise ResourceExhausted(
                f"UploadBlobs: {received + digest.size_bytes} bytes in one call is above the "
                f"limit of {self.max_upload}; split the upload into several calls"
            )
        if digest.size_bytes > self.budget:
            raise ResourceExhausted(
                f"blob {digest.sha256[:12]}: {digest.size_bytes} bytes is above the store's "
                f"budget of {self.budget}"
            )
        return digest

    def _commit(self, current: tuple[BlobDigest, Path, hashlib._Hash, int], owner: str) -> None:
        """Check the received blob against its digest and size, then make room and keep it.

        Raises:
            InvalidArgument: the content does not match.
        """
        digest, path, h, size = current
        if size != digest.size_bytes or h.hexdigest() != digest.sha256:
            path.unlink()
            raise InvalidArgument(
                f"blob {digest.sha256[:12]}: received {size} bytes hashing to "
                f"{h.hexdigest()[:12]}, not the {digest.size_bytes} bytes announced"
            )
        with self._lock:
            if owner:
                self._holders.setdefault(digest.sha256, set()).add(owner)
            if digest.sha256 in self._index:  # an earlier or concurrent upload of it won
                self._index.move_to_end(digest.sha256)
                path.unlink()
                return
            self._evict(self.budget - digest.size_bytes)
            path.chmod(0o600)
            path.replace(self.root / digest.sha256)
            self._index[digest.sha256] = digest.size_bytes
            self._total += digest.size_bytes

    def _evict(self, keep_at_most: int) -> None:
        """Drop least-recently-used blobs until at most `keep_at_most` bytes remain.
        Called with the lock held."""
        while self._index and self._total > keep_at_most:
            sha, size = self._index.popitem(last=False)
            self._holders.pop(sha, None)
            self._total -= size
            with contextlib.suppress(FileNotFoundError):
                (self.root / sha).unlink()

    def sizes(self) -> Iterator[tuple[str, int]]:
        """(digest, size) of the stored blobs, oldest use first; for tests and reports."""
        with self._lock:
            return iter(list(self._index.items()))
