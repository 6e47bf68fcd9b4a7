"""A blocking gRPC client for sandboxd, used by the CLI and the pytest plugin.

Status codes come back as the same `SandboxError` kinds the core raises, so
callers handle one error family whichever side of the wire they are on.
Calls that are safe to repeat are retried on UNAVAILABLE with backoff.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandboxd.info import ProfileInfo, ServerInfo
from sandboxd.limits import Caps, Limits

T = TypeVar("T")

OutputCallback = Callable[[int, bytes], None]
CHUNK = 256 * 1024
DIGESTS_FIRST_ABOVE = 256 * 1024
MAX_MESSAGE = 64 * 1024 * 1024
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
    err = kind(details or name, retry_after=_retry_after(exc))
    err.code = name
    return err


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


@dataclass(frozen=True)
class BuildResult:
    image: pb.Image
    cache_hit: bool
    build_seconds: float


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
        """Block until the service answers health checks as SERVING."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.EngineUnavailable(
                f"sandboxd at {self.address} did not answer within {timeout:.0f}s"
            ) from None
        self._retrying(lambda: self.health())

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
                        return BuildResult(r.image, r.cache_hit, r.build_seconds)
                    if on_log is not None:
                        on_log(event.log_line)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            raise errors.SandboxError("build stream ended without a result")

        def once() -> BuildResult:
            if digests_first:
                found = attempt(with_content=False)
                if found is not None:
                    return found
            found = attempt(with_content=True)
            if found is None:
                raise errors.SandboxError("the service asked for build content it was given")
            return found

        return self._retrying(once)

    def get_image(self, key: str) -> pb.Image:
        return self._retrying(lambda: self._call(self.images.GetImage, pb.GetImageRequest(key=key)))

    def list_images(self) -> list[pb.Image]:
        resp = self._retrying(lambda: self._call(self.images.ListImages, pb.ListImagesRequest()))
        return list(resp.images)

    def delete_image(self, key: str) -> None:
        self._call(self.images.DeleteImage, pb.DeleteImageRequest(key=key))

    # -- sandboxes ----------------------------------------------------------

    def create_sandbox(self, spec: pb.SandboxSpec, *, timeout: float | None = 300.0) -> pb.Sandbox:
        request = pb.CreateSandboxRequest(spec=spec)
        return self._retrying(
            lambda: self._call(self.sandboxes.CreateSandbox, request, timeout=timeout)
        )

    def prewarm(self, spec: pb.SandboxSpec, count: int = 1) -> None:
        """Ask the service to keep `count` more sandboxes of `spec` warm (a hint)."""
        request = pb.CreateSandboxRequest(spec=spec, prewarm=True)
        for _ in range(count):
            self._call(self.sandboxes.CreateSandbox, request, timeout=30.0)

    def get_sandbox(self, sandbox_id: str) -> pb.Sandbox:
        return self._call(self.sandboxes.GetSandbox, pb.GetSandboxRequest(sandbox_id=sandbox_id))

    def list_sandboxes(self) -> list[pb.Sandbox]:
        resp = self._retrying(
            lambda: self._call(self.sandboxes.ListSandboxes, pb.ListSandboxesRequest())
        )
        return list(resp.sandboxes)

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
    ) -> Iterator[pb.ExecEvent]:
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
            yield from self.sandboxes.Exec(request, metadata=self._metadata, timeout=deadline)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def exec(
        self,
        sandbox_id: str,
        argv: Iterable[str],
        *,
        on_output: OutputCallback | None = None,
        **kwargs: Any,
    ) -> pb.ExecResult:
        """Run a command to its end; output goes to `on_output(stream, data)`."""
        for event in self.exec_stream(sandbox_id, argv, **kwargs):
            if event.HasField("result"):
                return event.result
            if on_output is not None:
                on_output(event.output.stream, event.output.data)
        raise errors.SandboxError("exec stream ended without a result")

    def put_files(self, sandbox_id: str, path: str, tar_bytes: bytes) -> pb.PutFilesResponse:
        """Unpack a tar archive into `path` inside the sandbox."""

        def requests() -> Iterator[pb.PutFilesRequest]:
            yield pb.PutFilesRequest(header=pb.PutFilesHeader(sandbox_id=sandbox_id, path=path))
            for i in range(0, len(tar_bytes), CHUNK):
                yield pb.PutFilesRequest(tar_chunk=tar_bytes[i : i + CHUNK])

        try:
            return self.sandboxes.PutFiles(requests(), metadata=self._metadata, timeout=600.0)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def put_file_map(
        self, sandbox_id: str, path: str, files: Mapping[str, bytes | str]
    ) -> pb.PutFilesResponse:
        """Convenience: put a {relative path: content} mapping."""
        return self.put_files(sandbox_id, path, tar_of(files))

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

    def run_stream(
        self, request: pb.RunRequest, timeout: float | None = None
    ) -> Iterator[pb.RunEvent]:
        """Run's events; the default deadline covers a build and the longest exec."""
        if timeout is None:
            timeout = 2 * self._exec_deadline(0.0)
        try:
            yield from self.sandboxes.Run(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


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


def tar_of(files: Mapping[str, bytes | str], mode: int = 0o644) -> bytes:
    """A tar archive holding the given {relative path: content} files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
