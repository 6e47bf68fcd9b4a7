"""Build steps run sandboxed: a tenant's RUN gets no network, few capabilities, the
profile's limits and runtime, and a build ends, leaving nothing, at its deadline or
when its client goes away. Under runc and runsc."""

from __future__ import annotations

import secrets
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from abuse import RUNTIMES

from sandboxd import errors
from sandboxd.build_run import LABEL_BUILD, reap_build_leftovers
from sandboxd.client import SandboxClient
from sandboxd.config import DEFAULT_PROFILE, UNTRUSTED_PROFILE, Profile, ServerConfig
from sandboxd.engine.docker import DockerEngine
from sandboxd.images import LABEL_BUILDER
from sandboxd.limits import Limits, MiB
from sandboxd.server import Service

#: runc's twin of the untrusted profile; its build network is left to the server's
#: rule (none where clients authenticate), which the tests check too.
TENANT_RUNC = Profile(name="tenant-runc", runtime="runc", user="65534:65534")
#: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID: bits 0, 1, 3-7.
BUILD_CAPS_MASK = 0xFB


@dataclass(frozen=True)
class Tenant:
    client: SandboxClient
    instance_id: str
    runtime: str


# A step at a limit may stall under gVisor until a deadline ends it: the client's, set
# below the server's 60 s so such a test does not wait for the server's.
STALL_SECONDS = 25.0


@pytest.fixture(scope="module", params=RUNTIMES)
def tenant(
    request: pytest.FixtureRequest,
    base_image: str,
    short_tmp: Path,
    config_factory: Callable[..., ServerConfig],
) -> Iterator[Tenant]:
    """A client with a token on a server whose tenant builds run under `runtime`."""
    runtime = str(request.param)
    token = secrets.token_hex(16)
    tokens = short_tmp / f"build-tokens-{runtime}"
    tokens.write_text(f"{token} carol\n")
    tokens.chmod(0o600)
    config = config_factory(
        tokens_file=tokens,
        profiles=(DEFAULT_PROFILE, UNTRUSTED_PROFILE, TENANT_RUNC),
        build_profile="untrusted" if runtime == "runsc" else TENANT_RUNC.name,
        defaults=Limits(cpus=1.0, memory_bytes=128 * MiB, pids=64),
        build_timeout_seconds=60.0,
    )
    service = Service(config)
    address = service.listen("127.0.0.1:0")
    service.start()
    try:
        with SandboxClient(address, token=token, retry_seconds=5.0) as client:
            yield Tenant(client, config.instance_id, runtime)
    finally:
        service.stop(grace=2.0)


def build_log(tenant: Tenant, fragment: str, **kwargs: object) -> list[str]:
    """The output lines of a fresh build (a nonce keeps the cache out of it)."""
    lines: list[str] = []
    tenant.client.build_image(
        f"ENV BUILD_NONCE={uuid.uuid4().hex}\n{fragment}",
        on_log=lines.append,
        **kwargs,  # type: ignore[arg-type]
    )
    return [line.removeprefix(" ---> ") for line in lines if line.startswith(" ---> ")]


def docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)


def build_containers(instance_id: str) -> list[str]:
    """Ids of the build containers the instance still has, running or not."""
    out = docker("ps", "-aq", "--filter", f"label={LABEL_BUILD}={instance_id}")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def build_layers(instance_id: str) -> list[str]:
    """Untagged layers a build of the instance committed and left (none should be)."""
    out = docker("images", "-aq", "--filter", f"label={LABEL_BUILD}={instance_id}")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def built_images(instance_id: str) -> list[str]:
    out = docker("images", "-q", "--filter", f"label={LABEL_BUILDER}={instance_id}")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_tenants_run_step_sees_only_loopback_and_few_capabilities(tenant: Tenant) -> None:
    lines = build_log(
        tenant,
        'RUN python3 -c "import socket; print(sorted(n for _, n in socket.if_nameindex()))"'
        " && id -u && grep CapEff /proc/self/status",
    )
    assert lines[0] == "['lo']", lines
    assert lines[1] == "0"
    assert int(lines[2].split()[1], 16) == BUILD_CAPS_MASK, lines[2]


def test_a_run_step_cannot_spawn_over_the_process_limit(tenant: Tenant) -> None:
    script = (
        "import subprocess\n"
        "kids = []\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        kids.append(subprocess.Popen(['sleep', '60']))\n"
        "except OSError as exc:\n"
        "    print('refused', exc.errno)\n"
        "print('spawned', len(kids))\n"
        "for kid in kids:\n"
        "    kid.kill()\n"
    )
    try:
        lines = build_log(
            tenant, f"RUN <<EOF\npython3 - <<'PY'\n{script}PY\nEOF", timeout=STALL_SECONDS
        )
    except (errors.FailedPrecondition, errors.DeadlineExceeded) as exc:
        # gVisor's own threads count too: at the limit its sandbox ends, or stalls until
        # the build deadline ends it.
        assert tenant.runtime == "runsc", exc.message
        said = exc.message.lower()
        assert "sandbox was ended" in said or "deadline" in said, exc.message
        assert 'sandbox "' not in exc.message  # no internal ids
        return
    spawned = int(next(line for line in lines if line.startswith("spawned")).split()[1])
    assert any(line.startswith("refused") for line in lines), lines
    assert spawned < 64


def test_a_run_step_is_held_to_the_memory_limit(tenant: Tenant) -> None:
    # Under gVisor an out-of-memory sandbox may stall instead; the build deadline ends it.
    ends = (errors.FailedPrecondition,)
    if tenant.runtime == "runsc":
        ends = (errors.FailedPrecondition, errors.DeadlineExceeded)  # type: ignore[assignment]
    with pytest.raises(ends, match=r"(?i)fragment line 2|deadline"):
        build_log(
            tenant,
            "RUN python3 -c \"b = bytearray(400 * 1024 * 1024); print('got it')\"",
            timeout=STALL_SECONDS,
        )


def test_a_build_ends_with_its_clients_deadline(
    tenant: Tenant, waiter: Callable[..., bool]
) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        build_log(tenant, "RUN sleep 600", timeout=4.0)
    assert waiter(lambda: not build_containers(tenant.instance_id), 10.0), build_containers(
        tenant.instance_id
    )


def test_a_build_ends_at_the_servers_build_deadline(
    base_image: str,
    short_tmp: Path,
    config_factory: Callable[..., ServerConfig],
    waiter: Callable[..., bool],
) -> None:
    config = config_factory(build_timeout_seconds=3.0)
    service = Service(config)
    address = service.listen(f"unix:{short_tmp}/build-deadline.sock")
    service.start()
    try:
        with SandboxClient(address, retry_seconds=5.0) as client:
            with pytest.raises(errors.DeadlineExceeded, match=r"build deadline of 3s passed"):
                client.build_image(f"RUN echo {uuid.uuid4().hex}\nRUN sleep 600")
            assert waiter(lambda: not build_containers(config.instance_id), 10.0)
            assert not built_images(config.instance_id)
            # The first RUN's layer went too, although the deadline's removal of the second
            # step's container (made from it) ran on another thread.
            assert not build_layers(config.instance_id)
    finally:
        service.stop(grace=2.0)


def test_layers_of_a_build_whose_service_died_are_reaped(base_image: str) -> None:
    dead = f"dead{uuid.uuid4().hex[:12]}"  # an instance with no live process
    made = docker("create", base_image, "true")
    assert made.returncode == 0, made.stderr
    container = made.stdout.strip()
    try:
        layer = docker("commit", "--change", f"LABEL {LABEL_BUILD}={dead}", container)
        assert layer.returncode == 0, layer.stderr
    finally:
        docker("rm", "-f", container)
    assert build_layers(dead)
    assert reap_build_leftovers(DockerEngine()) >= 1
    assert not build_layers(dead)
