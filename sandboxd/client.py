"""A blocking gRPC client for sandboxd, used by the CLI, the grader and the pytest plugin.

Generated types stop here: callers give and get the records of sandboxd.api.
Status codes come back as the same `SandboxError` kinds the core raises, so
callers handle one error family whichever side of the wire they are on.
Calls that are safe to repeat are retried on UNAVAILABLE with backoff.

Over 450 lines: the client and its wire conversions belong together (the generated
types may not leave this module), and the conversions are one flat function each.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandboxd.api import (
    BuildResult,
    ExecResult,
    FilesPut,
    Image,
    OutputChunk,
    Sandbox,
    SandboxRequest,
    SandboxState,
    Stream,
)
from sandboxd.archives import FileContent, tar_of
from sandboxd.blobs import BlobDigest
from sandboxd.info import ProfileInfo, ServerInfo
from sandboxd.limits import Caps, Limits
from sandboxd.verdicts import by_wire

log = logging.getLogger(__name__)

T = TypeVar("T")

OutputCallback = Callable[[Stream, bytes], None]
CHUNK = 256 * 1024
DIGESTS_FIRST_ABOVE = 256 * 1024
MAX_MESSAGE = 64 * 1024 * 1024
#: Bytes per UploadBlobs message, and per call (a call never nears the service's cap).
BLOB_CHUNK = 1024 * 1024
UPLOAD_BATCH = 256 * 1024 * 1024
#: Room past an exec's own timeout for the service to kill and measure it.
DEADLINE_SLACK = 60.0


def _backoff() -> wait_exponential_jitter:
    """0.1 s doubling to 2 s; tenacity 9 renamed `initial` (now deprecated) to `multiplier`."""
    params = inspect.signature(wait_exponential_jitter).parameters
    first = "multiplier" if "multiplier" in params else "initial"
    return wait_exponential_jitter(max=2.0, **{first: 0.1})


def channel_target(address: str) -> str:
    """Turn `HOST:PORT` or `unix:PATH` into a gRPC target (gRPC takes both as is)."""
    if address.startswith("/"):
        return f"unix:{address}"
    return address


def from_rpc_error(exc: grpc.RpcError) -> errors.SandboxError:
    """Map a gRPC status back to the project's error kinds."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if name == "UNAVAILABLE" and not details:
        details = "sandboxd is not reachable"
    kind = errors.BY_CODE.get(name, errors.SandboxError)
    violations, retry_after = _details(exc)
    err = kind(details or name, retry_after=retry_after or _retry_after(exc))
    err.code = name
    if violations:
        err.violations = violations
        if isinstance(err, errors.InvalidArgument):
            err.field = violations[0].field
    return err


def _details(exc: grpc.RpcError) -> tuple[tuple[errors.FieldViolation, ...], float | None]:
    """The field violations and retry delay from the status's google.rpc details."""
    try:
        call = exc if isinstance(exc, grpc.Call) else None
        status = rpc_status.from_call(call) if call is not None else None
    except ValueError:  # details that contradict the status: trust neither
        return (), None
    violations: list[errors.FieldViolation] = []
    retry_after = None
    details: Iterable[Any] = status.details if status is not None else ()
    for detail in details:
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(bad):
            violations.extend(
                errors.FieldViolation(v.field, v.description) for v in bad.field_violations
            )
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return tuple(violations), retry_after


def _upload_messages(
    batch: list[BlobDigest], blobs: Mapping[BlobDigest, bytes]
) -> Iterator[pb.UploadBlobsRequest]:
    """One UploadBlobs stream: each blob's digest, then its bytes in chunks."""
    for d in batch:
        content = memoryview(blobs[d])
        yield pb.UploadBlobsRequest(
            digest=pb.BlobDigest(sha256=d.sha256, size_bytes=d.size_bytes),
            data=bytes(content[:BLOB_CHUNK]),
        )
        for start in range(BLOB_CHUNK, len(content), BLOB_CHUNK):
            yield pb.UploadBlobsRequest(data=bytes(content[start : start + BLOB_CHUNK]))


def _retry_after(exc: grpc.RpcError) -> float | None:
    """The service's "retry-after" trailer (seconds), if it sent one."""
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for item in trailers or ():
        if item.key == "retry-after":
            try:
                return float(item.value)
            except (TypeError, ValueError):
                return None
    return None


#: What `tls_credentials` makes; named here so callers need not import grpc.
TlsCredentials = grpc.ChannelCredentials


def tls_credentials(
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from PEM files; each one not given comes from
    SANDBOXD_TLS_CA / SANDBOXD_TLS_CERT / SANDBOXD_TLS_KEY. None when none is set.

    The CA verifies the server (the system's roots without it); cert and key are this
    client's identity for a server that requires client certificates (mTLS).

    Raises:
        InvalidArgument: only one of cert and key, or a file that cannot be read.
    """
    ca = ca or os.environ.get("SANDBOXD_TLS_CA") or None
    cert = cert or os.environ.get("SANDBOXD_TLS_CERT") or None
    key = key or os.environ.get("SANDBOXD_TLS_KEY") or None
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise errors.InvalidArgument(
            "a TLS client certificate needs its key and the key its certificate "
            "(--tls-cert with --tls-key, or SANDBOXD_TLS_CERT with SANDBOXD_TLS_KEY)"
        )

    def read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise errors.InvalidArgument(f"TLS {what} {path}: {exc.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca, "CA"),
        private_key=read(key, "key"),
        certificate_chain=read(cert, "certificate"),
    )


class SandboxClient:
    """Talks to one sandboxd over one channel."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        retry_seconds: float = 20.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address
        # A service that wants a token (TCP listeners with --tokens) gets it from here
        # unless the caller passes one: the CLI and the plugin both just work.
        token = token if token is not None else os.environ.get("SANDBOXD_TOKEN") or None
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ]
        target = channel_target(address)
        if credentials is None and not address.startswith("unix:"):
            # Like the token: TLS settings from the environment reach every client.
            credentials = tls_credentials()
        self._tls = credentials is not None
        if credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._retry_seconds = retry_seconds
        self._digests: dict[int, tuple[bytes, str]] = {}
        self._info: ServerInfo | None = None
        self.images = pb_grpc.ImageServiceStub(self._channel)
        self.sandboxes = pb_grpc.SandboxServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._about = pb_grpc.InfoServiceStub(self._channel)
        self._blobs = pb_grpc.BlobServiceStub(self._channel)
        #: Build-context bytes this client has sent, inline or as blobs (for measurements).
        self.context_bytes_sent = 0

    # -- plumbing -----------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[..., T], request: Any, *, timeout: float | None = 60.0) -> T:
        try:
            return fn(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _retrying(self, fn: Callable[[], T]) -> T:
        """Repeat a call that is safe to repeat while the service is unavailable."""
        retry = Retrying(
            retry=retry_if_exception_type(errors.EngineUnavailable),
            stop=stop_after_delay(self._retry_seconds),
            wait=_backoff(),
            reraise=True,
        )
        return retry(fn)

    # -- health -------------------------------------------------------------

    def health(self, timeout: float = 5.0) -> str:
        """The service's overall health status name (SERVING, NOT_SERVING...)."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the service answers health checks as SERVING.

        Raises:
            EngineUnavailable: no answer within `timeout`, or at once when the server
                closes every connection during the TLS handshake (wrong credentials).
        """
        ready = grpc.channel_ready_future(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready.result(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
                break
            except grpc.FutureTimeoutError:
                # A server refusing our credentials never gets ready: waiting longer is moot.
                hint = self._handshake_hint()
                if hint or time.monotonic() >= deadline:
                    ready.cancel()
                    raise errors.EngineUnavailable(
                        f"sandboxd at {self.address} did not answer within {timeout:.0f}s"
                        if not hint
                        else f"sandboxd at {self.address} refused the connection{hint}"
                    ) from None
        self._retrying(lambda: self.health())

    def _handshake_hint(self) -> str:
        """Why the connection failed, when one attempt says it was the TLS handshake
        (a listener that accepts and then closes the socket: gRPC reports "Socket closed")."""
        if self.address.startswith("unix:"):
            return ""
        try:
            self._health.Check(health_pb2.HealthCheckRequest(), timeout=5.0)
        except grpc.RpcError as exc:
            details = str(exc.details() if isinstance(exc, grpc.Call) else exc).lower()
            if any(w in details for w in ("handshake", "ssl", "tls", "socket closed")):
                return (
                    "; the TLS handshake failed: check the CA (--tls-ca, SANDBOXD_TLS_CA) and, "
                    "for a server that requires client certificates, --tls-cert/--tls-key "
                    "(SANDBOXD_TLS_CERT/SANDBOXD_TLS_KEY)"
                    if self._tls
                    else "; it may require TLS: give --tls-ca (and --tls-cert/--tls-key for "
                    "client certificates) or SANDBOXD_TLS_CA/_CERT/_KEY"
                )
        return ""

    # -- server -------------------------------------------------------------

    def server_info(self, *, refresh: bool = False) -> ServerInfo:
        """Caps, defaults, profiles, runtimes and versions; asked once per client."""
        if self._info is None or refresh:
            m = self._retrying(
                lambda: self._call(self._about.GetServerInfo, pb.GetServerInfoRequest())
            )
            self._info = info_from_pb(m)
        return self._info

    def _exec_deadline(self, timeout: float) -> float:
        """A call deadline: the exec's timeout (0: the server's cap) plus room to measure.
        A call without any deadline could wait forever on a service that stopped answering."""
        return (timeout or self.server_info().caps.timeout_seconds) + DEADLINE_SLACK

    # -- images -------------------------------------------------------------

    def _digest(self, content: bytes) -> str:
        """SHA-256 of build content, remembered per object: a session offers the same
        snapshot many times. The cache holds the object, so its id cannot be reused."""
        hit = self._digests.get(id(content))
        if hit is not None and hit[0] is content:
            return hit[1]
        if len(self._digests) > 50_000:
            self._digests.clear()
        digest = hashlib.sha256(content).hexdigest()
        self._digests[id(content)] = (content, digest)
        return digest

    def build_image(
        self,
        fragment: str = "",
        *,
        base: str = "",
        context_files: Mapping[str, bytes | tuple[bytes, int]] | None = None,
        label: str = "",
        on_log: Callable[[str], None] | None = None,
        timeout: float | None = 1800.0,
    ) -> BuildResult:
        """Build (or hit the cache for) base + fragment + context files."""
        files = []
        for path, value in (context_files or {}).items():
            content, mode = value if isinstance(value, tuple) else (value, 0)
            files.append((path, content, mode, self._digest(content)))
        # A large context is offered as digests first: on a cache hit (the usual case) the
        # service needs nothing more, and megabytes stay on this side.
        digests_first = sum(len(f[1]) for f in files) > DIGESTS_FIRST_ABOVE

        def request(with_content: bool) -> pb.BuildImageRequest:
            return pb.BuildImageRequest(
                base=base,
                fragment=fragment,
                context_files=[
                    pb.ContextFile(path=p, content=c if with_content else b"", mode=m, sha256=d)
                    for p, c, m, d in files
                ],
                label=label,
            )

        def attempt(with_content: bool) -> BuildResult | None:
            try:
                for event in self.images.BuildImage(
                    request(with_content), metadata=self._metadata, timeout=timeout
                ):
                    if event.HasField("result"):
                        r = event.result
                        if r.needs_content:
                            return None
                        return BuildResult(image_from_pb(r.image), r.cache_hit, r.build_seconds)
                    if on_log is not None:
                        on_log(event.log_line)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            raise errors.SandboxError("build stream ended without a result")

        def once() -> BuildResult:
            if digests_first:
                # A cache hit needs nothing more; otherwise the blobs the service lacks go
                # up in chunks and the build names them by digest. Twice: a blob may be
                # evicted between the upload and the build by another client's upload.
                for _ in range(2):
                    found = attempt(with_content=False)
                    if found is not None:
                        return found
                    self.upload_missing({BlobDigest(d, len(c)): c for _, c, _, d in files})
                raise errors.ResourceExhausted(
                    "the service's blob store evicted this build's context before the build "
                    "could use it; it is too small for this context and the concurrent uploads"
                )
            self.context_bytes_sent += sum(len(f[1]) for f in files)
            found = attempt(with_content=True)
            if found is None:
                raise errors.SandboxError("the service asked for build content it was given")
            return found

        return self._retrying(once)

    # -- blobs --------------------------------------------------------------

    def find_missing_blobs(self, digests: Iterable[BlobDigest]) -> list[BlobDigest]:
        """The digests the service's blob store lacks."""
        request = pb.FindMissingBlobsRequest(
            digests=[pb.BlobDigest(sha256=d.sha256, size_bytes=d.size_bytes) for d in digests]
        )
        resp = self._retrying(lambda: self._call(self._blobs.FindMissingBlobs, request))
        return [BlobDigest(d.sha256, d.size_bytes) for d in resp.missing]

    def upload_blobs(self, blobs: Mapping[BlobDigest, bytes]) -> int:
        """Send blobs in chunks, UPLOAD_BATCH bytes per call at most (a larger blob goes
        alone); return the bytes sent. No message carries more than BLOB_CHUNK bytes."""
        batches: list[list[BlobDigest]] = [[]]
        size = 0
        for digest in blobs:
            if batches[-1] and size + digest.size_bytes > UPLOAD_BATCH:
                batches.append([])
                size = 0
            batches[-1].append(digest)
            size += digest.size_bytes
        sent = 0
        for batch in batches:
            if batch:
                resp = self._call(
                    self._blobs.UploadBlobs, _upload_messages(batch, blobs), timeout=None
                )
                sent += resp.bytes
        self.context_bytes_sent += sent
        return sent

    def upload_missing(self, blobs: Mapping[BlobDigest, bytes]) -> int:
        """Upload only the blobs the service lacks; return the bytes sent."""
        missing = self.find_missing_blobs(blobs)
        return self.upload_blobs({d: blobs[d] for d in missing if d in blobs})

    def get_image(self, key: str) -> Image:
        request = pb.GetImageRequest(key=key)
        return image_from_pb(self._retrying(lambda: self._call(self.images.GetImage, request)))

    def list_images(self) -> list[Image]:
        resp = self._retrying(lambda: self._call(self.images.ListImages, pb.ListImagesRequest()))
        return [image_from_pb(m) for m in resp.images]

    def delete_image(self, key: str) -> None:
        self._call(self.images.DeleteImage, pb.DeleteImageRequest(key=key))

    # -- sandboxes ----------------------------------------------------------

    def create_sandbox(self, request: SandboxRequest, *, timeout: float | None = 300.0) -> Sandbox:
        """A new sandbox; the caller destroys it (or use `sandbox()`, which does)."""
        message = pb.CreateSandboxRequest(spec=request_to_pb(request))
        return sandbox_from_pb(
            self._retrying(
                lambda: self._call(self.sandboxes.CreateSandbox, message, timeout=timeout)
            )
        )

    @contextlib.contextmanager
    def sandbox(
        self, request: SandboxRequest, *, timeout: float | None = 300.0
    ) -> Iterator[SandboxHandle]:
        """Create, use, always destroy: the sandbox is gone when the block ends, also on an
        error or Ctrl-C, unless the block called `keep()` on it."""
        handle = SandboxHandle(self, self.create_sandbox(request, timeout=timeout))
        try:
            yield handle
        finally:
            if not handle.kept:
                handle.destroy(quiet=sys.exc_info()[0] is not None)

    def prewarm(self, request: SandboxRequest, count: int = 1) -> None:
        """Ask the service to keep `count` more sandboxes of `request` warm (a hint)."""
        message = pb.CreateSandboxRequest(spec=request_to_pb(request), prewarm=True)
        for _ in range(count):
            self._call(self.sandboxes.CreateSandbox, message, timeout=30.0)

    def get_sandbox(self, sandbox_id: str) -> Sandbox:
        request = pb.GetSandboxRequest(sandbox_id=sandbox_id)
        return sandbox_from_pb(self._call(self.sandboxes.GetSandbox, request))

    def list_sandboxes(self) -> list[Sandbox]:
        resp = self._retrying(
            lambda: self._call(self.sandboxes.ListSandboxes, pb.ListSandboxesRequest())
        )
        return [sandbox_from_pb(m) for m in resp.sandboxes]

    def destroy_sandbox(self, sandbox_id: str, *, missing_ok: bool = True) -> None:
        request = pb.DestroySandboxRequest(sandbox_id=sandbox_id)
        try:
            self._retrying(lambda: self._call(self.sandboxes.DestroySandbox, request))
        except errors.NotFound:
            if not missing_ok:
                raise

    def exec_stream(
        self,
        sandbox_id: str,
        argv: Iterable[str],
        *,
        stdin: bytes = b"",
        timeout: float = 0.0,
        output_limit: int = 0,
        env: Mapping[str, str] | None = None,
        workdir: str = "",
        attach_preload: bool = False,
    ) -> Iterator[OutputChunk | ExecResult]:
        """Yield output chunks as they come and the result last.

        With `attach_preload`, argv must be empty: stdin goes to the sandbox's preloaded
        command, which is already running.
        """
        request = pb.ExecRequest(
            sandbox_id=sandbox_id,
            argv=list(argv),
            stdin=stdin,
            timeout_seconds=timeout,
            output_limit_bytes=output_limit,
            env=dict(env or {}),
            workdir=workdir,
            attach_preload=attach_preload,
        )
        deadline = self._exec_deadline(timeout)
        try:
            for event in self.sandboxes.Exec(request, metadata=self._metadata, timeout=deadline):
                if event.HasField("result"):
                    yield result_from_pb(event.result)
                else:
                    yield OutputChunk(_STREAMS[event.output.stream], event.output.data)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def exec(
        self,
        sandbox_id: str,
        argv: Iterable[str],
        *,
        on_output: OutputCallback | None = None,
        **kwargs: Any,
    ) -> ExecResult:
        """Run a command to its end; output goes to `on_output(stream, data)`."""
        for event in self.exec_stream(sandbox_id, argv, **kwargs):
            if isinstance(event, ExecResult):
                return event
            if on_output is not None:
                on_output(event.stream, event.data)
        raise errors.SandboxError("exec stream ended without a result")

    def put_files(
        self, sandbox_id: str, path: str, files: bytes | Mapping[str, FileContent]
    ) -> FilesPut:
        """Unpack into `path` inside the sandbox: a tar archive, or {relative path: content}."""
        tar_bytes = files if isinstance(files, bytes) else tar_of(files)

        def requests() -> Iterator[pb.PutFilesRequest]:
            yield pb.PutFilesRequest(header=pb.PutFilesHeader(sandbox_id=sandbox_id, path=path))
            for i in range(0, len(tar_bytes), CHUNK):
                yield pb.PutFilesRequest(tar_chunk=tar_bytes[i : i + CHUNK])

        try:
            resp = self.sandboxes.PutFiles(requests(), metadata=self._metadata, timeout=600.0)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return FilesPut(resp.files, resp.bytes)

    def get_files(self, sandbox_id: str, path: str, *, max_bytes: int = 0) -> bytes:
        """A tar archive of `path` inside the sandbox."""
        request = pb.GetFilesRequest(sandbox_id=sandbox_id, path=path, max_bytes=max_bytes)
        out = bytearray()
        try:
            for chunk in self.sandboxes.GetFiles(request, metadata=self._metadata, timeout=600.0):
                out += chunk.data
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return bytes(out)


class SandboxHandle:
    """One sandbox and the calls on it; `SandboxClient.sandbox()` hands these out."""

    def __init__(self, client: SandboxClient, sandbox: Sandbox) -> None:
        self.client = client
        self.sandbox = sandbox
        self.kept = False

    @property
    def id(self) -> str:
        return self.sandbox.id

    def exec(
        self, argv: Iterable[str], *, on_output: OutputCallback | None = None, **kwargs: Any
    ) -> ExecResult:
        """Run a command to its end (see `SandboxClient.exec`)."""
        return self.client.exec(self.id, argv, on_output=on_output, **kwargs)

    def exec_stream(self, argv: Iterable[str], **kwargs: Any) -> Iterator[OutputChunk | ExecResult]:
        return self.client.exec_stream(self.id, argv, **kwargs)

    def put_files(self, path: str, files: bytes | Mapping[str, FileContent]) -> FilesPut:
        return self.client.put_files(self.id, path, files)

    def get_files(self, path: str, *, max_bytes: int = 0) -> bytes:
        return self.client.get_files(self.id, path, max_bytes=max_bytes)

    def keep(self) -> None:
        """Leave the sandbox running when the `with` block ends (e.g. to inspect it)."""
        self.kept = True

    def destroy(self, *, quiet: bool = False) -> None:
        """Destroy now; `quiet` logs a failure instead of raising it (while another error
        is on its way out, that one is the one to see)."""
        try:
            self.client.destroy_sandbox(self.id)
        except errors.SandboxError as exc:
            if not quiet:
                raise
            log.warning("could not destroy sandbox %s: %s", self.id, exc.message)


# -- wire conversions ---------------------------------------------------------

_STREAMS: dict[int, Stream] = {pb.STREAM_STDOUT: "stdout", pb.STREAM_STDERR: "stderr"}
_STATES: dict[int, SandboxState] = {
    pb.SANDBOX_STATE_RUNNING: "running",
    pb.SANDBOX_STATE_EXITED: "exited",
    pb.SANDBOX_STATE_DESTROYED: "destroyed",
}


def limits_to_pb(limits: Limits) -> pb.Limits:
    return pb.Limits(
        cpus=limits.cpus,
        memory_bytes=limits.memory_bytes,
        pids=limits.pids,
        scratch_bytes=limits.scratch_bytes,
        network=limits.network,
        timeout_seconds=limits.timeout_seconds,
        output_bytes=limits.output_bytes,
    )


def limits_from_pb(m: pb.Limits) -> Limits:
    return Limits(
        cpus=m.cpus,
        memory_bytes=m.memory_bytes,
        pids=m.pids,
        scratch_bytes=m.scratch_bytes,
        network=m.network,
        timeout_seconds=m.timeout_seconds,
        output_bytes=m.output_bytes,
    )


def request_to_pb(r: SandboxRequest) -> pb.SandboxSpec:
    """The owner is not sent: the server takes it from the caller's credentials."""
    return pb.SandboxSpec(
        image=r.image,
        limits=limits_to_pb(r.limits) if r.limits is not None else None,
        env=dict(r.env),
        workdir=r.workdir,
        runtime=r.runtime,
        ttl_seconds=r.ttl_seconds,
        profile=r.profile,
        labels=dict(r.labels),
        preload_argv=list(r.preload_argv),
    )


def request_from_pb(m: pb.SandboxSpec) -> SandboxRequest:
    return SandboxRequest(
        image=m.image,
        limits=limits_from_pb(m.limits) if m.HasField("limits") else None,
        env=dict(m.env),
        workdir=m.workdir,
        runtime=m.runtime,
        ttl_seconds=m.ttl_seconds,
        profile=m.profile,
        labels=dict(m.labels),
        preload_argv=tuple(m.preload_argv),
    )


def image_from_pb(m: pb.Image) -> Image:
    return Image(
        key=m.key,
        digest=m.digest,
        tag=m.tag,
        base=m.base,
        size_bytes=m.size_bytes,
        created_unix=m.created_unix,
        label=m.label,
    )


def sandbox_from_pb(m: pb.Sandbox) -> Sandbox:
    return Sandbox(
        id=m.id,
        request=request_from_pb(m.spec),
        limits=limits_from_pb(m.limits),
        image_digest=m.image_digest,
        container_id=m.container_id,
        state=_STATES.get(m.state, "unspecified"),
        created_unix=m.created_unix,
        expires_unix=m.expires_unix,
        runtime=m.runtime,
        create_seconds=m.create_seconds,
        from_pool=m.from_pool,
        preloaded=m.preloaded,
    )


def result_from_pb(m: pb.ExecResult) -> ExecResult:
    """Raises: SandboxError: a verdict this client does not know (a newer server)."""
    info = by_wire(m.verdict)
    if info is None:
        raise errors.SandboxError(
            f"the server sent verdict {m.verdict}, which this client does not know; "
            "update sandboxd on this side"
        )
    return ExecResult(
        exit_code=m.exit_code,
        signal=m.signal,
        verdict=info.name,
        wall_seconds=m.wall_seconds,
        cpu_seconds=m.cpu_seconds,
        peak_memory_bytes=m.peak_memory_bytes,
        output_truncated=m.output_truncated,
        message=m.message,
        stdout_bytes=m.stdout_bytes,
        stderr_bytes=m.stderr_bytes,
    )


def info_from_pb(m: pb.ServerInfo) -> ServerInfo:
    c = m.caps
    return ServerInfo(
        api_version=m.api_version,
        server_version=m.server_version,
        engine=m.engine,
        engine_version=m.engine_version,
        defaults=limits_from_pb(m.default_limits),
        caps=Caps(
            cpus=c.cpus,
            memory_bytes=c.memory_bytes,
            pids=c.pids,
            scratch_bytes=c.scratch_bytes,
            network=c.network,
            timeout_seconds=c.timeout_seconds,
            output_bytes=c.output_bytes,
            ttl_seconds=c.ttl_seconds,
            sandboxes=c.sandboxes,
        ),
        profiles=tuple(ProfileInfo(p.name, p.runtime, p.allow_network) for p in m.profiles),
        default_profile=m.default_profile,
        runtimes=tuple(m.runtimes),
        base_image=m.base_image,
        default_ttl_seconds=m.default_ttl_seconds,
    )
