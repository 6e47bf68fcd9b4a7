"""Content-addressed images: base + Dockerfile fragment + context files => one key.

Size: one store from request to engine image (key, cache, build, lookup, delete); the
fragment grammar, ownership and the builder already live in modules of their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from sandboxd.api import ContextFile, ImageRecord
from sandboxd.blobs import BlobStore
from sandboxd.build_run import BuildJob
from sandboxd.builder import make_builder
from sandboxd.config import ServerConfig
from sandboxd.engine.base import LABEL_KEY, LABEL_MANAGED, LABEL_OWNER, Engine
from sandboxd.errors import (
    EngineUnavailable,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SandboxError,
)
from sandboxd.fragments import Instruction, parse_fragment
from sandboxd.ownership import ImagePolicy, Ownership
from sandboxd.paths import check_relative

log = logging.getLogger(__name__)

#: The instance id of the service that built an image (a cache hit keeps the first one's).
LABEL_BUILDER = "sandbox.builder"

TAG_REPO = "sandbox/img"
MAX_FRAGMENT = 64 * 1024
MAX_CONTEXT = 48 * 1024 * 1024
_KEY = re.compile(r"^[0-9a-f]{64}$")
#: How long a base reference's resolved id is trusted before asking the engine again.
BASE_TTL = 5.0


#: How often DeleteImage releases the image and tries to remove it.
DELETE_ATTEMPTS = 20


def _listed(
    key: str, digest: str, tag: str, labels: Mapping[str, str], size: int, created: float = 0.0
) -> ImageRecord:
    """The record of an image as the engine describes it."""
    return ImageRecord(
        key=key,
        digest=digest,
        tag=tag,
        base=labels.get("sandbox.base", ""),
        size_bytes=size,
        label=labels.get("sandbox.label", ""),
        owner=labels.get(LABEL_OWNER, ""),
        created_unix=created,
    )


@dataclass(frozen=True)
class BuildOutcome:
    image: ImageRecord
    cache_hit: bool
    seconds: float


@dataclass(frozen=True)
class NeedsContent:
    """The key is not cached and the request carried digests only."""

    key: str


def image_key(base_id: str, fragment: str, context: list[ContextFile]) -> str:
    """The content key: same base image, fragment and context give the same key."""
    h = hashlib.sha256()
    h.update(
        json.dumps({"v": 1, "base": base_id, "fragment": normalize_fragment(fragment)}).encode()
    )
    for f in sorted(context, key=lambda c: c.path):
        h.update(json.dumps([f.path, f.mode or 0o644, f.digest()]).encode())
    return h.hexdigest()


def normalize_fragment(fragment: str) -> str:
    """Trailing spaces and blank lines do not change what a fragment builds."""
    lines = [line.rstrip() for line in fragment.replace("\r\n", "\n").split("\n")]
    return "\n".join(line for line in lines if line)


class ImageBuilder(Protocol):
    """Runs a build job; `sandboxd.builder.StepBuilder` is the real one."""

    def build(self, job: BuildJob, cancel: threading.Event | None = None) -> Iterator[str]: ...


def check_build_input(fragment: str, context: list[ContextFile]) -> tuple[Instruction, ...]:
    """The fragment's instructions, once fragment and context files are known to make a
    valid, bounded build.

    Raises:
        InvalidArgument: oversized, NUL bytes, a refused instruction (FROM, `--from`,
            remote ADD, VOLUME...), or a bad context path.
    """
    if len(fragment) > MAX_FRAGMENT:
        raise InvalidArgument(
            f"fragment: {len(fragment)} bytes is above the limit of {MAX_FRAGMENT}"
        )
    if "\x00" in fragment:
        raise InvalidArgument("fragment: contains a NUL byte")
    instructions = parse_fragment(fragment)
    total = 0
    seen: set[str] = set()
    for f in context:
        name = check_relative(f.path, field="context_files.path")
        if name == "Dockerfile":
            raise InvalidArgument("context_files.path: 'Dockerfile' is reserved for the fragment")
        if name in seen:
            raise InvalidArgument(f"context_files.path: {name!r} given twice")
        seen.add(name)
        if f.mode > 0o7777:
            raise InvalidArgument(f"context_files.mode: {oct(f.mode)} is not a permission mode")
        if f.sha256 and not _KEY.match(f.sha256):
            raise InvalidArgument(f"context_files.sha256: {name!r} has no hex SHA-256 digest")
        if f.sha256 and f.content and hashlib.sha256(f.content).hexdigest() != f.sha256:
            raise InvalidArgument(f"context_files.sha256: {name!r} does not match its content")
        total += len(f.content)
    if total > MAX_CONTEXT:
        raise InvalidArgument(
            f"context_files: {total} bytes in all is above the limit of {MAX_CONTEXT}"
        )
    return instructions


class ImageStore:
    """Builds images through the engine; answers repeated keys from the cache."""

    def __init__(
        self,
        engine: Engine,
        base_image: str,
        instance_id: str = "",
        blobs: BlobStore | None = None,
        policy: ImagePolicy | None = None,
        builder: ImageBuilder | None = None,
    ) -> None:
        self._engine = engine
        self.ownership = Ownership(policy or ImagePolicy(bases=(base_image,)), engine)
        self._builder = builder or make_builder(
            engine, ServerConfig(base_image=base_image, instance_id=instance_id)
        )
        #: Where digest-only context files find their content (uploaded with UploadBlobs).
        self.blobs = blobs
        self.base_image = base_image
        #: Recorded on every image built, so a cleanup can tell whose images are whose.
        self.instance_id = instance_id
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        self._cache: dict[str, ImageRecord] = {}
        self._bases: dict[str, tuple[str, float]] = {}
        self._verified: dict[str, float] = {}

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._building.setdefault(key, threading.Lock())

    def resolve_base(self, base: str, owner: str = "") -> tuple[str, str]:
        """(reference, identity) of the base; identity is the engine id when present.

        Raises:
            InvalidArgument: not an image reference.
            PermissionDenied: a base outside the operator's allowlist (for a tenant).
        """
        base = base or self.base_image
        self.ownership.check_base(base, owner)
        now = time.monotonic()
        with self._lock:
            hit = self._bases.get(base)
        if hit is not None and now - hit[1] < BASE_TTL:
            return base, hit[0]
        image_id = self._engine.image_id(base)
        # A base the engine does not have yet (e.g. python:3.12-slim elsewhere) is keyed by
        # its reference; the engine pulls it during the build if it can.
        identity = image_id or f"ref:{base}"
        if image_id:
            with self._lock:
                self._bases[base] = (identity, now)
        return base, identity

    def build(
        self,
        base: str,
        fragment: str,
        context: list[ContextFile],
        *,
        label: str = "",
        owner: str = "",
        cancel: threading.Event | None = None,
    ) -> Iterator[str | BuildOutcome | NeedsContent]:
        """Yield build log lines, then one BuildOutcome; `cancel` set ends the build.

        Raises:
            InvalidArgument: bad fragment or context.
            BuildFailed: a build step failed (the message names the fragment's line).
            DeadlineExceeded, Cancelled: the build's deadline passed, the client went away.
            EngineUnavailable: the engine cannot be reached.
        """
        instructions = check_build_input(fragment, context)
        started = time.monotonic()
        base_ref, base_id = self.resolve_base(base, owner)
        if not base_id.startswith("ref:"):
            self._check_ref(base_ref, base_id, owner)  # building FROM it would expose it too
        key = image_key(base_id, fragment, context)
        with self._key_lock(key):
            cached = self._lookup(key)
            if cached is not None and not self._proven(cached, context, owner):
                yield NeedsContent(key)  # a digest alone proves nothing about the content
                return
            if cached is not None:
                if owner and cached.owner != owner:
                    self.ownership.grant(key, owner)
                yield BuildOutcome(cached, True, time.monotonic() - started)
                return
            filled = self._filled(context, owner)
            if filled is None:
                yield NeedsContent(key)
                return
            context = filled
            tag = f"{TAG_REPO}:{key[:32]}"
            # role overrides the "base" role a derived image would inherit from its base.
            labels = {
                LABEL_MANAGED: "1",
                LABEL_KEY: key,
                "sandbox.base": base_ref,
                "sandbox.role": "image",
            }
            if label:
                labels["sandbox.label"] = label
            if self.instance_id:
                labels[LABEL_BUILDER] = self.instance_id
            if owner:
                labels[LABEL_OWNER] = owner
            files = {f.path: (f.content, f.mode or 0o644) for f in context}
            log.info("building image %s on %s", key[:12], base_ref)
            job = BuildJob(base_ref, instructions, files, tag, labels, owner, fragment)
            yield from self._builder.build(job, cancel)
            record = self._record(tag, key)
            if record is None:
                raise NotFound(f"image {tag} vanished right after its build")
            with self._lock:
                self._cache[key] = record
            yield BuildOutcome(record, False, time.monotonic() - started)

    def _proven(self, cached: ImageRecord, context: list[ContextFile], owner: str) -> bool:
        """Whether a tenant asking for another's image knows every file's content: it sent
        it, or uploaded the blob itself. Its digest alone is no proof."""
        if not owner or cached.owner == owner or self.ownership.granted(cached.key, owner):
            return True
        blobs = self.blobs
        return all(
            not f.digest_only or (blobs is not None and blobs.holds(f.sha256, owner))
            for f in context
        )

    def _filled(self, context: list[ContextFile], owner: str) -> list[ContextFile] | None:
        """The context with every digest-only file's content taken from the blob store;
        None when a blob is not there for `owner` (not uploaded by it, or evicted since)."""
        out = []
        for f in context:
            if f.digest_only:
                content = self.blobs.read(f.sha256, owner) if self.blobs is not None else None
                if content is None:
                    return None
                f = ContextFile(f.path, content, f.mode, f.sha256)
            out.append(f)
        return out

    def _lookup(self, key: str, *, trust_recent: bool = False) -> ImageRecord | None:
        """A cached image for `key`, checking the engine still has it."""
        now = time.monotonic()
        with self._lock:
            record = self._cache.get(key)
            fresh = trust_recent and now - self._verified.get(key, -BASE_TTL) < BASE_TTL
        # Every create names its image: within BASE_TTL of the last look, trust the cache
        # rather than ask the engine again (a removed image then fails the create itself).
        if record is not None and (fresh or self._engine.image_id(record.tag) == record.digest):
            if not fresh:
                with self._lock:
                    self._verified[key] = now
            return record
        record = self._record(f"{TAG_REPO}:{key[:32]}", key)
        with self._lock:
            if record is not None:
                self._cache[key] = record
                self._verified[key] = now
            else:
                self._verified.pop(key, None)
        return record

    def _record(self, tag: str, key: str) -> ImageRecord | None:
        """The image `tag` names if it carries `key`, from one look at it."""
        facts = self._engine.image_facts(tag)
        if facts is None or facts.labels.get(LABEL_KEY) != key:
            return None
        return _listed(key, facts.id, tag, facts.labels, facts.size, created=time.time())

    def may_use(self, record: ImageRecord, owner: str) -> bool:
        """Whether `owner` may see and run the image (see `sandboxd.ownership`)."""
        return self.ownership.may_use(record, owner)

    def get(self, key: str, owner: str = "") -> ImageRecord:
        """The image with this key or tag, if `owner` may use it.

        Raises:
            InvalidArgument: neither a key nor a tag.
            NotFound: no such image.
            PermissionDenied: another client's image.
        """
        if not _KEY.match(key):
            key = self._key_of_tag(key)
        record = self._lookup(key, trust_recent=True)
        if record is None:
            raise NotFound(f"no image with key {key[:12]}...; build it first")
        if not self.may_use(record, owner):
            raise PermissionDenied(f"image {key[:12]} belongs to another client")
        return record

    def _key_of_tag(self, tag: str) -> str:
        """The content key of the image a tag names, when it is one of this service's.

        Raises:
            InvalidArgument: not a key or tag; NotFound: no image of ours has that tag.
        """
        if not tag or "\x00" in tag or len(tag) > 512 or tag != tag.strip():
            raise InvalidArgument(
                f"key: {tag[:80]!r} is neither an image key (64 hex digits) nor a tag"
            )
        try:
            key = self._engine.image_labels(tag).get(LABEL_KEY, "")
        except NotFound:
            key = ""
        if not _KEY.match(key):
            raise NotFound(f"no image built by sandboxd has the tag {tag[:80]!r}")
        return key

    def list(self, owner: str = "") -> list[ImageRecord]:
        """The service's images that `owner` may use."""
        out = []
        for image_id, tags, labels, size in self._engine.list_images(LABEL_KEY):
            key = labels.get(LABEL_KEY, "")
            tags = [t for t in tags if t != "<none>:<none>"]
            if not tags:
                continue  # an untagged leftover: neither usable nor addressable by its key
            tag = next((t for t in tags if t.startswith(TAG_REPO + ":")), tags[0])
            out.append(_listed(key, image_id, tag, labels, size))
        return [r for r in out if self.may_use(r, owner)]

    def delete(
        self, key: str, owner: str = "", release: Callable[[str], None] = lambda _: None
    ) -> None:
        """Remove the image for `key` (or tag) from the engine; a client may delete only
        images it built. `release(image id)` first makes the containers on it go.

        Raises:
            NotFound: no such image.
            PermissionDenied: the image is not the caller's.
            FailedPrecondition: a live sandbox still uses it.
        """
        record = self.get(key, owner)
        if owner and record.owner != owner:
            raise PermissionDenied(f"image {record.key[:12]} belongs to another client")
        with self._lock:
            self._cache.pop(record.key, None)
            self._verified.pop(record.key, None)
        # A container the pool or a destroy was still settling may hold the image for a
        # moment after `release`: release again and retry before giving up.
        for attempt in range(DELETE_ATTEMPTS):
            release(record.digest)
            try:
                # By id, not by tag: removing a tag leaves the image behind as <none>.
                self._engine.remove_image(record.digest)
                return
            except (NotFound, EngineUnavailable):
                raise
            except SandboxError:
                if attempt == DELETE_ATTEMPTS - 1:
                    raise
                time.sleep(0.5)

    def resolve_ref(self, ref: str, owner: str = "") -> tuple[str, str]:
        """(engine reference, digest) for a key, tag or reference given by a client.

        Raises:
            NotFound: the engine has no such image.
            PermissionDenied: the reference names another client's image.
        """
        ref = ref or self.base_image
        if "\x00" in ref or len(ref) > 512:
            raise InvalidArgument("spec.image: not an image reference")
        if _KEY.match(ref):
            record = self.get(ref, owner)
            return record.tag, record.digest
        digest = self._engine.image_id(ref)
        if digest is None:
            hint = (
                "run `sandboxd bootstrap-image` to make it"
                if ref == self.base_image
                else "build it first or check the name"
            )
            raise NotFound(f"image {ref!r} is not in the engine; {hint}")
        self._check_ref(ref, digest, owner)
        return ref, digest

    def _check_ref(self, ref: str, digest: str, owner: str) -> None:
        """A tag or id of one of our builds is checked like its key: no way around by name."""
        if not owner:
            return
        labels = self._engine.image_labels(ref)
        record = ImageRecord(
            key=labels.get(LABEL_KEY, ""), digest=digest, tag=ref, base="",
            owner=labels.get(LABEL_OWNER, ""),
        )  # fmt: skip
        if not self.may_use(record, owner):
            raise PermissionDenied(f"image {ref[:80]!r} belongs to another client")
