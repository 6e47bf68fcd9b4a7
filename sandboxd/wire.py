"""Conversions between the domain records and the generated messages, both directions.

Only the gRPC adapters (sandboxd/client.py, sandboxd/service.py) import this module, so
generated types stop there; a field added to the API is converted in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import (
    CloseStdin,
    ContextFile,
    ExecInput,
    ExecOutcome,
    ExecRequest,
    ExecResult,
    ExecStart,
    Image,
    ImageRecord,
    Mount,
    ProfileInfo,
    Resize,
    Sandbox,
    SandboxRequest,
    SandboxState,
    ServerInfo,
    Signal,
    Stdin,
    Stream,
    WindowSize,
)
from sandboxd.limits import Caps, Limits
from sandboxd.verdicts import VERDICTS, by_wire

if TYPE_CHECKING:  # the service's record; a client imports none of the service
    from sandboxd.models import SandboxRecord

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
        mounts=[pb.Mount(source=m.source, target=m.target, writable=m.writable) for m in r.mounts],
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
        mounts=tuple(Mount(x.source, x.target, x.writable) for x in m.mounts),
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
        profiles=tuple(
            ProfileInfo(p.name, p.runtime, p.allow_network, p.allow_port_forward, p.allow_mounts)
            for p in m.profiles
        ),
        default_profile=m.default_profile,
        runtimes=tuple(m.runtimes),
        base_image=m.base_image,
        default_ttl_seconds=m.default_ttl_seconds,
        mount_roots=tuple(m.mount_roots),
        writable_mount_roots=tuple(m.writable_mount_roots),
    )


_STATE_WIRE = {
    "running": pb.SANDBOX_STATE_RUNNING,
    "exited": pb.SANDBOX_STATE_EXITED,
    "destroyed": pb.SANDBOX_STATE_DESTROYED,
}


def image_to_pb(record: ImageRecord) -> pb.Image:
    return pb.Image(
        key=record.key,
        digest=record.digest,
        tag=record.tag,
        base=record.base,
        size_bytes=record.size_bytes,
        created_unix=record.created_unix,
        label=record.label,
    )


def caps_to_pb(caps: Caps) -> pb.Caps:
    return pb.Caps(
        cpus=caps.cpus,
        memory_bytes=caps.memory_bytes,
        pids=caps.pids,
        scratch_bytes=caps.scratch_bytes,
        network=caps.network,
        timeout_seconds=caps.timeout_seconds,
        output_bytes=caps.output_bytes,
        ttl_seconds=caps.ttl_seconds,
        sandboxes=caps.sandboxes,
    )


def info_to_pb(info: ServerInfo) -> pb.ServerInfo:
    return pb.ServerInfo(
        api_version=info.api_version,
        server_version=info.server_version,
        engine=info.engine,
        engine_version=info.engine_version,
        default_limits=limits_to_pb(info.defaults),
        caps=caps_to_pb(info.caps),
        profiles=[
            pb.ProfileInfo(
                name=p.name,
                runtime=p.runtime,
                allow_network=p.allow_network,
                allow_port_forward=p.allow_port_forward,
                allow_mounts=p.allow_mounts,
            )
            for p in info.profiles
        ],
        default_profile=info.default_profile,
        runtimes=list(info.runtimes),
        base_image=info.base_image,
        default_ttl_seconds=info.default_ttl_seconds,
        mount_roots=list(info.mount_roots),
        writable_mount_roots=list(info.writable_mount_roots),
    )


def sandbox_to_pb(r: SandboxRecord) -> pb.Sandbox:
    return pb.Sandbox(
        id=r.id,
        spec=request_to_pb(r.request),
        limits=limits_to_pb(r.limits),
        image_digest=r.image_digest,
        container_id=r.container_id,
        state=_STATE_WIRE[r.state],
        created_unix=r.created_unix,
        expires_unix=r.expires_unix,
        runtime=r.runtime,
        create_seconds=r.create_seconds,
        from_pool=r.from_pool,
        preloaded=r.preload is not None,
    )


def outcome_to_pb(o: ExecOutcome) -> pb.ExecResult:
    j = o.judgement
    return pb.ExecResult(
        exit_code=j.exit_code,
        signal=j.signal,
        verdict=pb.Verdict.ValueType(VERDICTS[j.verdict].wire),
        wall_seconds=o.wall_seconds,
        cpu_seconds=o.cpu_seconds,
        peak_memory_bytes=o.peak_memory_bytes,
        output_truncated=o.output_truncated,
        message=j.message,
        stdout_bytes=o.stdout_bytes,
        stderr_bytes=o.stderr_bytes,
    )


def context_from_pb(request: pb.BuildImageRequest) -> list[ContextFile]:
    return [ContextFile(f.path, f.content, f.mode, f.sha256) for f in request.context_files]


def exec_request_from_pb(m: pb.ExecRequest) -> ExecRequest:
    return ExecRequest(
        argv=list(m.argv),
        stdin=m.stdin,
        timeout_seconds=m.timeout_seconds,
        output_limit_bytes=m.output_limit_bytes,
        env=dict(m.env),
        workdir=m.workdir,
        attach_preload=m.attach_preload,
    )


def exec_start_from_pb(m: pb.ExecStart) -> ExecStart:
    window = m.window if m.HasField("window") else None
    return ExecStart(
        sandbox_id=m.request.sandbox_id,
        request=exec_request_from_pb(m.request),
        tty=m.tty,
        window=WindowSize(window.rows, window.columns) if window is not None else None,
    )


def exec_input_from_pb(m: pb.ExecInput) -> ExecInput:
    """Raises: InvalidArgument: a second start, or an empty message."""
    kind = m.WhichOneof("input")
    if kind == "stdin":
        return Stdin(m.stdin)
    if kind == "resize":
        return Resize(WindowSize(m.resize.rows, m.resize.columns))
    if kind == "signal":
        return Signal(m.signal)
    if kind == "close_stdin":
        return CloseStdin()
    if kind == "start":
        raise errors.InvalidArgument("start: only the first message may start the command")
    raise errors.InvalidArgument("input: the message carries nothing", field="input")


def exec_request_to_pb(sandbox_id: str, r: ExecRequest) -> pb.ExecRequest:
    return pb.ExecRequest(
        sandbox_id=sandbox_id,
        argv=list(r.argv),
        stdin=r.stdin,
        timeout_seconds=r.timeout_seconds,
        output_limit_bytes=r.output_limit_bytes,
        env=dict(r.env),
        workdir=r.workdir,
        attach_preload=r.attach_preload,
    )


def exec_start_to_pb(start: ExecStart) -> pb.ExecStart:
    w = start.window
    return pb.ExecStart(
        request=exec_request_to_pb(start.sandbox_id, start.request),
        tty=start.tty,
        window=pb.WindowSize(rows=w.rows, columns=w.columns) if w is not None else None,
    )


def exec_input_to_pb(item: ExecInput) -> pb.ExecInput:
    if isinstance(item, Stdin):
        return pb.ExecInput(stdin=item.data)
    if isinstance(item, Resize):
        return pb.ExecInput(
            resize=pb.WindowSize(rows=item.window.rows, columns=item.window.columns)
        )
    if isinstance(item, Signal):
        return pb.ExecInput(signal=item.name)
    return pb.ExecInput(close_stdin=True)
