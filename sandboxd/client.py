"""A blocking gRPC client for sandboxd, used by the CLI, the grader and the pytest plugin.

Generated types stop here: callers give and get the records of sandboxd.api (the
conversions are in sandboxd.wire). Status codes come back as the same `SandboxError`
kinds the core raises (sandboxd.channels), so callers handle one error family whichever
side of the wire they are on. Calls that are safe to repeat are retried on UNAVAILABLE
with backoff.

Size: one method per RPC plus the sandbox handle; splitting the class would scatter
one API over several modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
)

from sandboxd import errors, wire
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandboxd.api import (
    BuildResult,
    CloseStdin,
    ExecInput,
    ExecRequest,
    ExecResult,
    ExecStart,
    FilesPut,
    Image,
    OutputChunk,
    Resize,
    Sandbox,
    SandboxRequest,
    ServerInfo,
    Signal,
    Stdin,
    Stream,
    WindowSize,
)
from sandboxd.archives import FileContent, tar_of
from sandboxd.blobs import BlobDigest
from sandboxd.channels import (
    backoff,
    channel_target,
    from_rpc_error,
    tls_credentials,
)

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
            wait=backoff(),
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
            self._info = wire.info_from_pb(m)
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
                        return BuildResult(
                            wire.image_from_pb(r.image), r.cache_hit, r.build_seconds
                        )
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
        return wire.image_from_pb(self._retrying(lambda: self._call(self.images.GetImage, request)))

    def list_images(self) -> list[Image]:
        resp = self._retrying(lambda: self._call(self.images.ListImages, pb.ListImagesRequest()))
        return [wire.image_from_pb(m) for m in resp.images]

    def delete_image(self, key: str) -> None:
        self._call(self.images.DeleteImage, pb.DeleteImageRequest(key=key))

    # -- sandboxes ----------------------------------------------------------

    def create_sandbox(self, request: SandboxRequest, *, timeout: float | None = 300.0) -> Sandbox:
        """A new sandbox; the caller destroys it (or use `sandbox()`, which does)."""
        message = pb.CreateSandboxRequest(spec=wire.request_to_pb(request))
        return wire.sandbox_from_pb(
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
        message = pb.CreateSandboxRequest(spec=wire.request_to_pb(request), prewarm=True)
        for _ in range(count):
            self._call(self.sandboxes.CreateSandbox, message, timeout=30.0)

    def get_sandbox(self, sandbox_id: str) -> Sandbox:
        request = pb.GetSandboxRequest(sandbox_id=sandbox_id)
        return wire.sandbox_from_pb(self._call(self.sandboxes.GetSandbox, request))

    def list_sandboxes(self) -> list[Sandbox]:
        resp = self._retrying(
            lambda: self._call(self.sandboxes.ListSandboxes, pb.ListSandboxesRequest())
        )
        return [wire.sandbox_from_pb(m) for m in resp.sandboxes]

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
        request = wire.exec_request_to_pb(
            sandbox_id,
            ExecRequest(
                argv=list(argv),
                stdin=stdin,
                timeout_seconds=timeout,
                output_limit_bytes=output_limit,
                env=dict(env or {}),
                workdir=workdir,
                attach_preload=attach_preload,
            ),
        )
        deadline = self._exec_deadline(timeout)
        try:
            for event in self.sandboxes.Exec(request, metadata=self._metadata, timeout=deadline):
                if event.HasField("result"):
                    yield wire.result_from_pb(event.result)
                else:
                    yield OutputChunk(wire._STREAMS[event.output.stream], event.output.data)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def exec_session(
        self,
        sandbox_id: str,
        argv: Iterable[str],
        *,
        tty: bool = False,
        window: tuple[int, int] | None = None,
        stdin: bytes = b"",
        timeout: float = 0.0,
        env: Mapping[str, str] | None = None,
        workdir: str = "",
    ) -> ExecSession:
        """Start an interactive exec (ExecStream): stdin, resizes and signals go in while
        its output comes out. `window` is (rows, columns), required with `tty`."""
        start = ExecStart(
            sandbox_id=sandbox_id,
            request=ExecRequest(
                argv=list(argv),
                stdin=stdin,
                timeout_seconds=timeout,
                env=dict(env or {}),
                workdir=workdir,
            ),
            tty=tty,
            window=WindowSize(*window) if window is not None else None,
        )
        return ExecSession(self, start, self._exec_deadline(timeout))

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

    def port_forward(
        self, sandbox_id: str, port: int, upstream: Iterable[bytes]
    ) -> Iterator[bytes]:
        """One TCP connection to `port` inside the sandbox: `upstream` is what to send (its
        end half-closes the connection); the result yields what comes back until the other
        side closes. Closing the result early ends the connection."""

        def frames() -> Iterator[pb.PortForwardFrame]:
            yield pb.PortForwardFrame(header=pb.PortForwardHeader(sandbox_id=sandbox_id, port=port))
            for data in upstream:
                yield pb.PortForwardFrame(data=data)

        # No deadline: a forwarded connection lasts as long as its two ends want.
        call = self.sandboxes.PortForward(frames(), metadata=self._metadata)
        try:
            for frame in call:
                yield frame.data
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            # Ends the relay inside too; a finished call ignores it. (The stubs leave
            # RpcContext.cancel untyped.)
            call.cancel()  # type: ignore[no-untyped-call]


class ExecSession:
    """One interactive exec: `write`, `resize`, `signal` and `close_stdin` may be called
    from any thread while another iterates `events()`."""

    def __init__(self, client: SandboxClient, start: ExecStart, deadline: float) -> None:
        self._inputs: queue.Queue[ExecInput | None] = queue.Queue()
        first = pb.ExecInput(start=wire.exec_start_to_pb(start))
        self._call = client.sandboxes.ExecStream(
            self._requests(first), metadata=client._metadata, timeout=deadline
        )

    def _requests(self, first: pb.ExecInput) -> Iterator[pb.ExecInput]:
        yield first
        while (item := self._inputs.get()) is not None:
            yield wire.exec_input_to_pb(item)

    def write(self, data: bytes) -> None:
        self._inputs.put(Stdin(data))

    def resize(self, rows: int, columns: int) -> None:
        self._inputs.put(Resize(WindowSize(rows, columns)))

    def signal(self, name: str) -> None:
        self._inputs.put(Signal(name))

    def close_stdin(self) -> None:
        self._inputs.put(CloseStdin())

    def close(self) -> None:
        """End the input side (the service then ends the call once the command has)."""
        self._inputs.put(None)

    def cancel(self) -> None:
        """Give up: the service kills the command."""
        self.close()
        self._call.cancel()  # type: ignore[no-untyped-call]

    def events(self) -> Iterator[OutputChunk | ExecResult]:
        """Output chunks as they come, then the result; the input side closes with it.

        Raises:
            SandboxError: the call failed (its status, as the matching kind).
        """
        try:
            for event in self._call:
                if event.HasField("result"):
                    self.close()
                    yield wire.result_from_pb(event.result)
                else:
                    yield OutputChunk(wire._STREAMS[event.output.stream], event.output.data)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


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
