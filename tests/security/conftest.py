"""The abuse suite's service: tokens on TCP, the operator on a unix socket, both runtimes.

Every sandbox made through `box` is checked on the way out: destroyed, its container gone
from the engine, its processes gone from the host, the host still able to start a
process, and the service still answering health checks.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from abuse import (
    PUBLIC_IMAGE,
    RUNTIMES,
    SecureService,
    assert_gone,
    inspect,
    proc_start,
    suite_limits,
)

from sandboxd.api import Sandbox, SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.server import Service


@pytest.fixture(scope="session")
def secure(
    base_image: str, short_tmp: Path, config_factory: Callable[..., object]
) -> Iterator[SecureService]:
    """A sandboxd with bearer tokens on 127.0.0.1:0 and an operator unix socket."""
    tokens = {"alice": secrets.token_hex(16), "bob": secrets.token_hex(16)}
    path = short_tmp / "tokens"
    path.write_text("".join(f"{t} {name}\n" for name, t in tokens.items()))
    path.chmod(0o600)
    config = config_factory(
        tokens_file=path,
        max_sandboxes_per_client=3,
        reap_foreign=False,
        public_images=(PUBLIC_IMAGE,),
        max_calls_per_client=16,
        first_message_seconds=5.0,
    )
    service = Service(config)  # type: ignore[arg-type]
    unix = service.listen(f"unix:{short_tmp}/secure.sock")
    tcp = service.listen("127.0.0.1:0")
    service.start()
    try:
        yield SecureService(service, unix, tcp, tokens)
    finally:
        service.stop(grace=2.0)


@pytest.fixture(scope="session")
def operator(secure: SecureService) -> Iterator[SandboxClient]:
    client = SandboxClient(secure.unix, retry_seconds=5.0)
    client.wait_ready(timeout=10.0)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def alice(secure: SecureService) -> Iterator[SandboxClient]:
    """A tenant, by its bearer token on TCP."""
    with SandboxClient(secure.tcp, token=secure.tokens["alice"], retry_seconds=2.0) as client:
        yield client


@pytest.fixture
def bob(secure: SecureService) -> Iterator[SandboxClient]:
    """Another tenant."""
    with SandboxClient(secure.tcp, token=secure.tokens["bob"], retry_seconds=2.0) as client:
        yield client


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def box(
    operator: SandboxClient, runtime: str
) -> Iterator[Callable[..., contextlib.AbstractContextManager[Sandbox]]]:
    """Factory of `with box(**limits) as sandbox:` untrusted sandboxes on this runtime."""

    @contextlib.contextmanager
    def make(client: SandboxClient = operator, **limits: object) -> Iterator[Sandbox]:
        spec = SandboxRequest(profile="untrusted", runtime=runtime, limits=suite_limits(**limits))
        sandbox = client.create_sandbox(spec)
        info = inspect(sandbox.container_id) or {}
        pid = int((info.get("State") or {}).get("Pid") or 0)  # type: ignore[union-attr]
        start = proc_start(pid)
        try:
            yield sandbox
        finally:
            client.destroy_sandbox(sandbox.id)
            assert_gone(operator, sandbox.container_id, pid, start)

    yield make
