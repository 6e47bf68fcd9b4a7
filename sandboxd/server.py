"""Wiring: engine, core, servicers, health, reflection, shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Collection
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from sandboxd.auth import AuthInterceptor, load_tokens, server_credentials
from sandboxd.blobs import BlobStore
from sandboxd.config import ServerConfig
from sandboxd.engine import Engine, make_engine
from sandboxd.engine.base import RoomMaking
from sandboxd.errors import EngineUnavailable, InvalidArgument
from sandboxd.execs import Executor
from sandboxd.images import ImageStore
from sandboxd.info import describe_server
from sandboxd.sandboxes import SandboxManager
from sandboxd.service import BlobServicer, ImageServicer, InfoServicer, SandboxServicer

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024 * 1024
#: Longest unix socket path the kernel takes, its final NUL excluded.
UNIX_PATH_MAX = 107
LOOPBACK = ("127.0.0.1", "localhost", "::1")
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["ImageService"].full_name,
    pb.DESCRIPTOR.services_by_name["SandboxService"].full_name,
    pb.DESCRIPTOR.services_by_name["InfoService"].full_name,
    pb.DESCRIPTOR.services_by_name["BlobService"].full_name,
)


def _v1_reflection_descriptor() -> None:
    """Add grpc.reflection.v1 to the default pool, so reflection can describe itself in v1
    too: its file is v1alpha's with the package renamed (grpcio-reflection ships only v1alpha).
    """
    pool = descriptor_pool.Default()
    with contextlib.suppress(KeyError):
        pool.FindServiceByName(REFLECTION_V1)
        return
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(old, new, 1)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new, 1)
        method.output_type = method.output_type.replace(old, new, 1)
    pool.Add(proto)


def enable_reflection(service_names: tuple[str, ...], server: grpc.Server) -> None:
    """Serve reflection as both grpc.reflection.v1 and v1alpha: clients speak one or the
    other, and the two differ only in their package name (the messages are the same bytes)."""
    _v1_reflection_descriptor()
    servicer = reflection.ReflectionServicer(
        (*service_names, reflection.SERVICE_NAME, REFLECTION_V1)
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(
                name,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            )
            for name in (reflection.SERVICE_NAME, REFLECTION_V1)
        )
    )


@dataclass
class Core:
    """The plain-Python side of one service instance."""

    config: ServerConfig
    engine: Engine
    images: ImageStore
    manager: SandboxManager
    executor: Executor


def make_core(config: ServerConfig, engine: Engine | None = None) -> Core:
    if engine is None:
        engine = make_engine(config)
    blobs = BlobStore(config.state_dir / "blobs" / config.instance_id)
    images = ImageStore(engine, config.base_image, config.instance_id, blobs)
    manager = SandboxManager(config, engine, images)
    pool = manager.pool
    if pool is not None and isinstance(engine, RoomMaking):
        # Every warm container goes: the engine cannot say which node the new one needs.
        engine.make_room = lambda: pool.evict(1 << 62) > 0
    return Core(config, engine, images, manager, Executor(manager))


class Service:
    """A running sandboxd: one gRPC server over one core."""

    def __init__(
        self, config: ServerConfig, engine: Engine | None = None, max_workers: int = 64
    ) -> None:
        self.config = config
        self.core = make_core(config, engine)
        tokens = load_tokens(config.tokens_file) if config.tokens_file else None
        self.authenticated = tokens is not None or config.tls_client_ca is not None
        # Always installed: even without credentials it drops a client-sent owner header.
        self.auth = AuthInterceptor(tokens, tls_names=config.tls_client_ca is not None)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sandboxd-rpc"),
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=max_workers * 4,
            interceptors=[self.auth],
        )
        pb_grpc.add_ImageServiceServicer_to_server(
            ImageServicer(self.core.images, self.core.manager.release_image), self.server
        )
        pb_grpc.add_SandboxServiceServicer_to_server(
            SandboxServicer(self.core.manager, self.core.executor, self.core.images), self.server
        )
        if self.core.images.blobs is not None:
            pb_grpc.add_BlobServiceServicer_to_server(
                BlobServicer(self.core.images.blobs), self.server
            )
        pb_grpc.add_InfoServiceServicer_to_server(
            InfoServicer(lambda: describe_server(config, self.core.engine)), self.server
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), self.server)
        self.address = ""
        self._stopped = threading.Event()

    def listen(self, address: str) -> str:
        """Bind `HOST:PORT` (port 0 picks one) or `unix:PATH`; return the bound address.

        Raises:
            InvalidArgument: the address cannot be bound.
        """
        if address.startswith("unix:"):
            path = Path(address[len("unix:") :].removeprefix("//"))
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            old = os.umask(0o077)  # the socket is created 0600: only its owner may connect
            try:
                self.server.add_insecure_port(f"unix:{path}")
            except RuntimeError as exc:
                raise InvalidArgument(f"cannot listen on {address}: {exc}") from None
            finally:
                os.umask(old)
            self.address = f"unix:{path}"
        else:
            host = address.rsplit(":", 1)[0]
            if not self.authenticated and host.strip("[]") not in LOOPBACK:
                raise InvalidArgument(
                    f"refusing to serve {address} without authentication: give --tokens FILE "
                    "(and/or --tls-client-ca), or listen on 127.0.0.1 or a unix socket"
                )
            cfg = self.config
            try:
                if cfg.tls_cert and cfg.tls_key:
                    creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
                    port = self.server.add_secure_port(address, creds)
                elif cfg.tls_cert or cfg.tls_key or cfg.tls_client_ca:
                    raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
                else:
                    port = self.server.add_insecure_port(address)
            except RuntimeError as exc:
                raise InvalidArgument(f"cannot listen on {address}: {exc}") from None
            self.address = f"{host}:{port}"
        return self.address

    def start(self) -> None:
        """Reap leftovers of dead instances, then serve."""
        try:
            self.core.engine.ping()
        except EngineUnavailable as exc:
            log.warning("%s; serving anyway, calls fail with UNAVAILABLE until it is back", exc)
        self.core.manager.start()
        if self.core.images.blobs is not None:
            self.core.images.blobs.start()
        self.server.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("sandboxd %s serving on %s", self.config.instance_id, self.address)

    def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def stop(self, grace: float = 5.0, keep: Collection[str] = ()) -> None:
        """Stop taking calls, give running ones `grace` seconds, remove every sandbox
        except those in `keep`."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        done = self.server.stop(grace)
        # Sandboxes go only after the calls using them have finished or been cancelled:
        # removing them first turned execs that would have finished in time into errors.
        done.wait(grace + 1)
        self.core.manager.stop(keep)
        if self.core.images.blobs is not None:
            self.core.images.blobs.stop()
        if self.address.startswith("unix:"):
            with contextlib.suppress(OSError):
                Path(self.address[len("unix:") :]).unlink()
        log.info("sandboxd %s stopped", self.config.instance_id)

    def wait(self) -> None:
        self.server.wait_for_termination()


def create_server(
    config: ServerConfig, address: str, engine: Engine | None = None
) -> tuple[Service, str]:
    """A started service listening on `address`, and the address it bound."""
    service = Service(config, engine)
    bound = service.listen(address)
    service.start()
    return service, bound


class Embedded:
    """A sandboxd inside this process on a private unix socket, for the CLI and the plugin."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self._tmp = _private_dir(self.config.state_dir)
        self.service, self.address = create_server(self.config, f"unix:{self._tmp}/sandboxd.sock")

    def stop(self, grace: float = 5.0, keep: Collection[str] = ()) -> None:
        self.service.stop(grace, keep)
        with contextlib.suppress(OSError):
            os.rmdir(self._tmp)


def _private_dir(state_dir: Path) -> str:
    """A new directory only this user can enter, for an embedded service's socket.

    Under the state dir when a socket path there fits the kernel's limit (108 bytes).
    """
    parent: Path | None = state_dir
    if len(str(state_dir)) > UNIX_PATH_MAX - len("/sandboxd-embedded-12345678/sandboxd.sock"):
        log.info("state dir %s is too long for a socket path; using the temp dir", state_dir)
        parent = None
    else:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return tempfile.mkdtemp(prefix="sandboxd-embedded-", dir=parent)


def start_embedded(config: ServerConfig | None = None) -> Embedded:
    """Start an in-process sandboxd; `.address` for the client, `.stop()` removes its sandboxes."""
    return Embedded(config)


def serve_forever(service: Service, grace: float = 10.0) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully and return."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    service.stop(grace)
