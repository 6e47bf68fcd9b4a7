"""The gRPC adapter: proto -> domain -> core -> proto. Errors map to status codes here only.

Conversions both ways live in sandboxd/wire.py: a field added to the API is converted once.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from sandboxd import errors, wire
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandboxd.admission import call_deadline
from sandboxd.api import ExecOutcome, ExecRequest, Output, ServerInfo
from sandboxd.blobs import BlobDigest, BlobStore, UploadPart
from sandboxd.execs import Executor
from sandboxd.forwarding import Forwarder
from sandboxd.images import BuildOutcome, ImageStore, NeedsContent
from sandboxd.sandboxes import SandboxManager, SandboxRecord, SandboxRequest
from sandboxd.sessions import run_session
from sandboxd.transfers import Transfers

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

#: Metadata key an authenticating interceptor sets to the caller's client name.
OWNER_KEY = "x-sandbox-client"


@contextlib.contextmanager
def temporary_sandbox(manager: SandboxManager, request: SandboxRequest) -> Iterator[SandboxRecord]:
    """Create, use, always destroy, on the server side (the client's `sandbox()` twin):
    a failed destroy is logged, not raised over the call's own outcome."""
    record = manager.create(request)
    try:
        yield record
    finally:
        try:
            manager.destroy(record.id)
        except errors.SandboxError as exc:
            log.warning("destroying %s after use: %s", record.id, exc)


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _detail_messages(exc: errors.SandboxError) -> list[any_pb2.Any]:
    """The standard google.rpc details for `exc`: BadRequest naming the fields at fault,
    RetryInfo saying when to come back."""
    details: list[any_pb2.Any] = []
    if exc.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in exc.violations
            ]
        )
        details.append(_packed(bad))
    if exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(datetime.timedelta(seconds=exc.retry_after))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return details


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def abort_with(context: grpc.ServicerContext, exc: BaseException) -> None:
    """The one place errors become statuses. No traceback ever reaches a client.

    The message is for a person; the same facts go along as google.rpc error details (and
    the retry hint also as a "retry-after" trailer, which older clients read).
    """
    if isinstance(exc, errors.SandboxError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        message = exc.message
        trailers: list[tuple[str, str | bytes]] = []
        if exc.retry_after is not None:
            trailers.append(("retry-after", f"{exc.retry_after:g}"))
            message = f"{message} (retry after {exc.retry_after:g}s)"
        if code == grpc.StatusCode.INTERNAL:
            log.warning("internal: %s", message)
        details = _detail_messages(exc)
        if details:
            status = rpc_status.to_status(
                status_pb2.Status(
                    code=getattr(code_pb2, code.name), message=message, details=details
                )
            )
            trailers.extend(status.trailing_metadata)
        context.abort_with_status(_Status(code, message, tuple(trailers)))
    incident = uuid.uuid4().hex[:8]
    log.error("unexpected error (incident %s)", incident, exc_info=exc)
    context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in sandboxd (incident {incident}; details are in the service log)",
    )


def unary(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:
            abort_with(context, exc)
            raise  # unreachable: abort raises

    return wrapper  # type: ignore[return-value]


def streaming(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:
            abort_with(context, exc)

    return wrapper  # type: ignore[return-value]


def owner_of(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == OWNER_KEY:
            return str(value)
    return ""


def request_from_pb(spec: pb.SandboxSpec, owner: str) -> SandboxRequest:
    """The owner comes from the caller's credentials, never from the request."""
    return replace(wire.request_from_pb(spec), owner=owner)


def _header(messages: Iterator[Any], rpc: str) -> Any:
    """The header of a client stream's first message.

    Raises:
        InvalidArgument: the stream is empty or starts with something else.
    """
    first = next(messages, None)
    if first is None or not first.HasField("header"):
        raise errors.InvalidArgument(f"{rpc}: the first message must be the header", field="header")
    return first.header


def _after_header(messages: Iterator[Any], rpc: str) -> Iterator[Any]:
    """The rest of a client stream. Raises: InvalidArgument: another header."""
    for message in messages:
        if message.HasField("header"):
            raise errors.InvalidArgument(
                f"{rpc}: only the first message may be a header", field="header"
            )
        yield message


def _chunk(event: Output) -> pb.OutputChunk:
    return pb.OutputChunk(stream=pb.Stream.ValueType(event.stream), data=event.data)


def _exec_events(events: Iterator[Output | ExecOutcome]) -> Iterator[pb.ExecEvent]:
    for event in events:
        if isinstance(event, Output):
            yield pb.ExecEvent(output=_chunk(event))
        else:
            yield pb.ExecEvent(result=wire.outcome_to_pb(event))


def _cancel_event(context: grpc.ServicerContext) -> threading.Event:
    """Set when the client goes away, so the exec is killed instead of running on."""
    event = threading.Event()
    context.add_callback(event.set)
    return event


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, describe: Callable[[], ServerInfo]) -> None:
        self.describe = describe

    @unary
    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.ServerInfo:
        return wire.info_to_pb(self.describe())


class ImageServicer(pb_grpc.ImageServiceServicer):
    def __init__(self, images: ImageStore, release: Callable[[str], None] = lambda _: None) -> None:
        self.images = images
        #: Makes the containers on an image go before it is deleted (the sandbox manager's).
        self.release = release

    @streaming
    def BuildImage(
        self, request: pb.BuildImageRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.BuildImageEvent]:
        files, owner = wire.context_from_pb(request), owner_of(context)
        cancel = _cancel_event(context)
        for item in self.images.build(
            request.base, request.fragment, files, label=request.label, owner=owner, cancel=cancel
        ):
            if isinstance(item, NeedsContent):
                yield pb.BuildImageEvent(result=pb.BuildImageResult(needs_content=True))
            elif isinstance(item, BuildOutcome):
                yield pb.BuildImageEvent(
                    result=pb.BuildImageResult(
                        image=wire.image_to_pb(item.image),
                        cache_hit=item.cache_hit,
                        build_seconds=item.seconds,
                    )
                )
            else:
                yield pb.BuildImageEvent(log_line=item)

    @unary
    def GetImage(self, request: pb.GetImageRequest, context: grpc.ServicerContext) -> pb.Image:
        return wire.image_to_pb(self.images.get(request.key, owner_of(context)))

    @unary
    def ListImages(
        self, request: pb.ListImagesRequest, context: grpc.ServicerContext
    ) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(
            images=[wire.image_to_pb(r) for r in self.images.list(owner_of(context))]
        )

    @unary
    def DeleteImage(
        self, request: pb.DeleteImageRequest, context: grpc.ServicerContext
    ) -> pb.DeleteImageResponse:
        self.images.delete(request.key, owner_of(context), self.release)
        return pb.DeleteImageResponse()


class BlobServicer(pb_grpc.BlobServiceServicer):
    """The build context's content-addressed store: only what the service lacks travels."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    @unary
    def FindMissingBlobs(
        self, request: pb.FindMissingBlobsRequest, context: grpc.ServicerContext
    ) -> pb.FindMissingBlobsResponse:
        wanted = [BlobDigest(d.sha256, d.size_bytes) for d in request.digests]
        missing = self.blobs.missing(wanted, owner_of(context))
        return pb.FindMissingBlobsResponse(
            missing=[pb.BlobDigest(sha256=d.sha256, size_bytes=d.size_bytes) for d in missing]
        )

    @unary
    def UploadBlobs(
        self, request_iterator: Iterator[pb.UploadBlobsRequest], context: grpc.ServicerContext
    ) -> pb.UploadBlobsResponse:
        parts = (
            UploadPart(
                BlobDigest(m.digest.sha256, m.digest.size_bytes) if m.HasField("digest") else None,
                m.data,
            )
            for m in request_iterator
        )
        blobs, size = self.blobs.upload(parts, owner_of(context))
        return pb.UploadBlobsResponse(blobs=blobs, bytes=size)


class SandboxServicer(pb_grpc.SandboxServiceServicer):
    def __init__(self, manager: SandboxManager, executor: Executor, images: ImageStore) -> None:
        self.manager = manager
        self.executor = executor
        self.files = Transfers(executor)
        self.images = images
        self.forwarder = Forwarder(manager)

    @unary
    def CreateSandbox(
        self, request: pb.CreateSandboxRequest, context: grpc.ServicerContext
    ) -> pb.Sandbox:
        if request.prewarm:
            self.manager.prewarm(request_from_pb(request.spec, owner_of(context)))
            return pb.Sandbox()
        with call_deadline(context.time_remaining()):
            record = self.manager.create(request_from_pb(request.spec, owner_of(context)))
        if not context.is_active():  # the client gave up while we were creating
            self.manager.destroy(record.id)
            raise errors.Cancelled("client went away during creation")
        return wire.sandbox_to_pb(record)

    @unary
    def GetSandbox(
        self, request: pb.GetSandboxRequest, context: grpc.ServicerContext
    ) -> pb.Sandbox:
        return wire.sandbox_to_pb(self.manager.get(request.sandbox_id, owner_of(context)))

    @unary
    def ListSandboxes(
        self, request: pb.ListSandboxesRequest, context: grpc.ServicerContext
    ) -> pb.ListSandboxesResponse:
        return pb.ListSandboxesResponse(
            sandboxes=[wire.sandbox_to_pb(r) for r in self.manager.list(owner_of(context))]
        )

    @unary
    def DestroySandbox(
        self, request: pb.DestroySandboxRequest, context: grpc.ServicerContext
    ) -> pb.DestroySandboxResponse:
        self.manager.destroy(request.sandbox_id, owner_of(context))
        return pb.DestroySandboxResponse()

    @streaming
    def Exec(
        self, request: pb.ExecRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExecEvent]:
        yield from _exec_events(
            self.executor.run(
                request.sandbox_id,
                wire.exec_request_from_pb(request),
                owner_of(context),
                _cancel_event(context),
            )
        )

    @streaming
    def ExecStream(
        self, request_iterator: Iterator[pb.ExecInput], context: grpc.ServicerContext
    ) -> Iterator[pb.ExecEvent]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("input") != "start":
            raise errors.InvalidArgument(
                "start: the first message must start the command", field="start"
            )
        yield from _exec_events(
            run_session(
                self.executor,
                wire.exec_start_from_pb(first.start),
                (wire.exec_input_from_pb(m) for m in request_iterator),
                owner_of(context),
                _cancel_event(context),
            )
        )

    @unary
    def PutFiles(
        self, request_iterator: Iterator[pb.PutFilesRequest], context: grpc.ServicerContext
    ) -> pb.PutFilesResponse:
        header = _header(request_iterator, "PutFiles")
        chunks = (m.tar_chunk for m in _after_header(request_iterator, "PutFiles"))
        files, size = self.files.put_files(
            header.sandbox_id, header.path, chunks, owner_of(context)
        )
        return pb.PutFilesResponse(files=files, bytes=size)

    @streaming
    def GetFiles(
        self, request: pb.GetFilesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FileChunk]:
        for data in self.files.get_files(
            request.sandbox_id, request.path, request.max_bytes, owner_of(context)
        ):
            yield pb.FileChunk(data=data)

    @streaming
    def Run(self, request: pb.RunRequest, context: grpc.ServicerContext) -> Iterator[pb.RunEvent]:
        owner = owner_of(context)
        spec = request.spec
        image_pb: pb.Image | None = None
        cache_hit = False
        if request.HasField("build"):
            b = request.build
            files = wire.context_from_pb(b)
            builds = self.images.build(
                b.base, b.fragment, files, label=b.label, owner=owner, cancel=_cancel_event(context)
            )
            for item in builds:
                if isinstance(item, NeedsContent):
                    raise errors.InvalidArgument(
                        "build.context_files: give the content, not just digests, in a Run"
                    )
                if isinstance(item, BuildOutcome):
                    image_pb, cache_hit = wire.image_to_pb(item.image), item.cache_hit
                else:
                    yield pb.RunEvent(build_log_line=item)
            assert image_pb is not None
            spec = pb.SandboxSpec()
            spec.CopyFrom(request.spec)
            spec.image = image_pb.key
        with temporary_sandbox(self.manager, request_from_pb(spec, owner)) as record:
            self.files.collect_paths(record.id, request.collect, owner)  # refused up front
            if request.files_tar:
                self.files.put_files(record.id, "", [request.files_tar], owner)
            result = None
            for event in self.executor.run(
                record.id,
                ExecRequest(argv=list(request.argv), stdin=request.stdin),
                owner,
                _cancel_event(context),
            ):
                if isinstance(event, Output):
                    yield pb.RunEvent(output=_chunk(event))
                else:
                    result = wire.outcome_to_pb(event)
            collected = self.files.collect(record.id, request.collect, owner)
            yield pb.RunEvent(
                result=pb.RunResult(
                    image=image_pb,
                    cache_hit=cache_hit,
                    sandbox=wire.sandbox_to_pb(record),
                    exec=result,
                    collected_tar=collected.tar,
                    missing_paths=collected.missing,
                )
            )

    @streaming
    def PortForward(
        self, request_iterator: Iterator[pb.PortForwardFrame], context: grpc.ServicerContext
    ) -> Iterator[pb.PortForwardFrame]:
        header = _header(request_iterator, "PortForward")
        connection = self.forwarder.open(header.sandbox_id, header.port, owner_of(context))
        if not context.add_callback(connection.close):  # at the call's end, however it ends
            connection.close()  # it has ended already
            return
        connection.feed(f.data for f in _after_header(request_iterator, "PortForward"))
        try:
            for data in connection.received():
                yield pb.PortForwardFrame(data=data)
        finally:
            connection.close()
