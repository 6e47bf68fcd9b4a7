"""Who may see and use an image: its builder, clients granted it, and the operator's public
images. The base images a client may build on come from the operator's allowlist.

A client named by its credentials (a tenant) sees only what it built, what it was granted by
building the same content itself, and what the operator made public; the operator (no
owner: the unix socket, or a server without authentication) sees everything.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from sandboxd.engine.base import LABEL_KEY, Engine
from sandboxd.errors import InvalidArgument, NotFound, PermissionDenied

#: How long the engine ids of the public references are trusted before asking again.
PUBLIC_TTL = 5.0
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
#: Docker's reference grammar: [host[:port]/]path[:tag][@sha256:digest], lower-case path.
_REFERENCE = re.compile(
    rf"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)
_IMAGE_ID = re.compile(r"^sha256:[0-9a-f]{64}$")


class Image(Protocol):
    """What ownership looks at in an image record (`sandboxd.images.ImageRecord`)."""

    @property
    def key(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def tag(self) -> str: ...
    @property
    def owner(self) -> str: ...


@dataclass(frozen=True)
class ImagePolicy:
    """The operator's word on images (from the server config)."""

    #: References tenants may build on; the first is the default base.
    bases: tuple[str, ...]
    #: Further images (reference, tag or key) every client may see and run.
    public: tuple[str, ...] = ()


def registry_host(ref: str) -> str:
    """The registry a reference names, "" for none: Docker reads the first path component
    as a host when it has a dot or a port, or is `localhost`."""
    first, slash, _ = ref.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return ""


def check_reference(ref: str, field: str) -> str:
    """`ref` when it is one image reference (or engine image id), nothing more.

    Raises:
        InvalidArgument: anything else, e.g. a newline that would add Dockerfile lines.
    """
    if len(ref) > 512 or not (_REFERENCE.match(ref) or _IMAGE_ID.match(ref)):
        raise InvalidArgument(
            f"{field}: {ref[:80]!r} is not an image reference (NAME[:TAG] or an image id)",
            field=field,
        )
    return ref


class Ownership:
    """Decides `may_use` and which bases a client may build on."""

    def __init__(
        self,
        policy: ImagePolicy,
        engine: Engine,
    ) -> None:
        self.policy = policy
        self._engine = engine
        self._lock = threading.Lock()
        # Clients other than the image's owner that built the same content themselves: knowing
        # every input, they learn nothing by using it. In memory only; a rebuild grants again.
        self._grants: dict[str, set[str]] = {}
        self._public_ids: tuple[frozenset[str], float] = (frozenset(), -PUBLIC_TTL)

    def grant(self, key: str, owner: str) -> None:
        with self._lock:
            self._grants.setdefault(key, set()).add(owner)

    def granted(self, key: str, owner: str) -> bool:
        with self._lock:
            return owner in self._grants.get(key, ())

    def public(self, record: Image) -> bool:
        """Whether the operator made the image everyone's (the bases always are)."""
        names = {*self.policy.bases, *self.policy.public}
        if record.tag in names or (record.key and record.key in names):
            return True
        return bool(record.digest) and record.digest in self._public_digests(names)

    def _public_digests(self, names: set[str]) -> frozenset[str]:
        """The engine ids of the public names; trusted for PUBLIC_TTL when every name was
        found, asked again each time while one is missing (an image tagged since)."""
        ids, when = self._public_ids
        now = time.monotonic()
        if now - when < PUBLIC_TTL:
            return ids
        found = set()
        missing = 0
        for name in names:
            try:
                digest = self._engine.image_id(name)
            except NotFound:
                digest = None
            if digest:
                found.add(digest)
            else:
                missing += 1
        complete = missing == 0
        self._public_ids = (frozenset(found), now if complete else -PUBLIC_TTL)
        return frozenset(found)

    def may_use(self, record: Image, owner: str) -> bool:
        """The operator ("") reaches every image; a tenant its own, those it was granted
        and the public ones. Operator-built images are not public unless listed."""
        if not owner or (record.owner and record.owner == owner):
            return True
        if record.key and self.granted(record.key, owner):
            return True
        return self.public(record)

    def check_base(self, ref: str, owner: str) -> None:
        """A tenant builds only on an allowlisted base or on an image this server built (whether
        it may use that one is `may_use`'s call); nothing it names makes the engine contact a
        registry.

        Raises:
            InvalidArgument: not an image reference.
            PermissionDenied: a registry host, or an image that is neither.
        """
        check_reference(ref, "base")
        if not owner or ref in self.policy.bases:
            return
        allowed = ", ".join(self.policy.bases)
        host = registry_host(ref)
        if host:
            raise PermissionDenied(
                f"base: {ref[:80]!r} names the registry {host!r}; this server builds only on "
                f"its own base images ({allowed}) and on images it built"
            )
        try:
            labels = self._engine.image_labels(ref)
        except NotFound:
            labels = {}
        if not labels.get(LABEL_KEY):
            raise PermissionDenied(
                f"base: {ref[:80]!r} is not one of this server's base images ({allowed}) "
                "nor an image it built"
            )
