"""The engine-neutral contract, run against every local engine (Docker, Podman) in one session.

Each test runs once per engine through a real service configured with `engine = NAME`;
the differences between engines that users can see are tested at the end of the file.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sandboxd_cli import SANDBOXD, wait_for

from sandboxd import errors
from sandboxd.api import ExecResult, Sandbox, SandboxRequest, requested_limits
from sandboxd.client import SandboxClient
from sandboxd.config import ServerConfig
from sandboxd.engine import LOCAL_ENGINES, Engine, make_engine
from sandboxd.engine.base import LABEL_INSTANCE, ContainerSpec
from sandboxd.engine.podman import PodmanEngine
from sandboxd.limits import MiB
from sandboxd.server import Service, create_server

FORK_BOMB = (
    "import os, time\nend = time.monotonic() + 3\nwhile time.monotonic() < end:\n    os.fork()\n"
)
ALLOCATE = "import sys; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096])"


def containers_of(engine: Engine, instance_id: str) -> list[str]:
    return [c.id for c in engine.list_containers(f"{LABEL_INSTANCE}={instance_id}")]


@pytest.fixture(scope="module", params=LOCAL_ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def engine_client(
    engine_name: str,
    base_image: str,
    short_tmp: Path,
    config_factory: Callable[..., ServerConfig],
) -> Iterator[SandboxClient]:
    """A client of a service on `engine_name`; nothing of that service is left after it."""
    config = config_factory(engine=engine_name)
    service: Service
    service, _ = create_server(config, f"unix:{short_tmp}/engine-{engine_name}.sock")
    client = SandboxClient(service.address, retry_seconds=5.0)
    try:
        client.wait_ready(timeout=20.0)
        yield client
    finally:
        client.close()
        service.stop(grace=2.0)
        # The session-end check sees Docker only: this one covers every engine.
        engine = make_engine(config)
        assert wait_for(lambda: not containers_of(engine, config.instance_id), 15), (
            f"containers left behind on {engine_name}"
        )


@pytest.fixture
def make_box(engine_client: SandboxClient) -> Iterator[Callable[..., Sandbox]]:
    """Factory: a sandbox on the module's engine, destroyed after the test."""
    made: list[str] = []

    def make(memory: int = 64 * MiB, pids: int = 32, **spec: object) -> Sandbox:
        limits = requested_limits(cpus=1.0, memory_bytes=memory, pids=pids, timeout_seconds=20.0)
        box = engine_client.create_sandbox(SandboxRequest(limits=limits, **spec))  # type: ignore[arg-type]
        made.append(box.id)
        return box

    yield make
    for sandbox_id in made:
        engine_client.destroy_sandbox(sandbox_id)


def run(
    client: SandboxClient, box: Sandbox, argv: list[str], timeout: float = 20.0
) -> tuple[ExecResult, str]:
    out = bytearray()
    result = client.exec(box.id, argv, on_output=lambda _, d: out.extend(d), timeout=timeout)
    return result, out.decode(errors="replace")


def verdict(result: ExecResult) -> str:
    return result.verdict


@pytest.mark.parametrize(
    ("argv", "timeout", "expected", "message"),
    [
        (["true"], 20.0, "ok", ""),
        (["sh", "-c", "exit 3"], 20.0, "nonzero_exit", ""),
        (["sleep", "30"], 1.0, "timed_out", "timed out after 1.0s"),
        (["python3", "-c", ALLOCATE, "200"], 20.0, "out_of_memory", "out of memory (limit 64"),
        (["python3", "-c", FORK_BOMB], 20.0, "pids_exhausted", "process limit (32) reached"),
    ],
    ids=["ok", "nonzero_exit", "timed_out", "out_of_memory", "pids_exhausted"],
)
def test_verdicts(
    engine_client: SandboxClient,
    make_box: Callable[..., Sandbox],
    argv: list[str],
    timeout: float,
    expected: str,
    message: str,
) -> None:
    # The fork bomb's 32 python processes must meet the process limit, not the memory one
    # (their copied pages can pass 64 MiB on a loaded machine, and an OOM kill decides).
    box = make_box(memory=256 * MiB) if expected == "pids_exhausted" else make_box()
    result, out = run(engine_client, box, argv, timeout=timeout)
    assert verdict(result) == expected, (result, out)
    assert message in result.message, result.message
    # The sandbox outlives a limit kill of one command. (A fork bomb's children may still
    # hold the process limit for the rest of their 3 s after the command ended.)
    deadline = time.monotonic() + 15
    while verdict(after := run(engine_client, box, ["true"])[0]) != "ok":
        assert time.monotonic() < deadline and expected == "pids_exhausted", after
        time.sleep(0.5)


def test_protections_and_limits_hold(
    engine_client: SandboxClient, make_box: Callable[..., Sandbox]
) -> None:
    box = make_box(memory=64 * MiB, pids=32)
    script = (
        "ls /sys/class/net; id -u; touch /probe 2>/dev/null && echo rw || echo ro; "
        "grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status; "
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max; "
        "echo x > /tmp/t && echo y > ./w && pwd"
    )
    result, out = run(engine_client, box, ["sh", "-c", script])
    assert verdict(result) == "ok", out
    lines = out.split()
    assert lines[0] == "lo" and lines[1] != "0" and lines[2] == "ro", out
    assert "CapEff:\t0000000000000000" in out and "CapBnd:\t0000000000000000" in out, out
    assert "NoNewPrivs:\t1" in out, out
    assert str(64 * MiB) in lines and "32" in lines, out
    assert lines[-1] == "/sandbox/work", out


def test_measurements_are_per_exec(
    engine_client: SandboxClient, make_box: Callable[..., Sandbox]
) -> None:
    box = make_box(memory=128 * MiB)
    big, _ = run(engine_client, box, ["python3", "-c", ALLOCATE, "60"])
    small, _ = run(engine_client, box, ["true"])
    assert verdict(big) == "ok" and verdict(small) == "ok"
    assert big.peak_memory_bytes >= 60 * MiB, big
    assert big.cpu_seconds > 0, big
    assert 0 < small.peak_memory_bytes < 40 * MiB, "the peak was reset between execs"


def test_files_in_and_out(engine_client: SandboxClient, make_box: Callable[..., Sandbox]) -> None:
    box = make_box()
    payload = os.urandom(100_000)
    engine_client.put_files(box.id, "/sandbox/work", {"in/data.bin": payload})
    result, out = run(engine_client, box, ["sh", "-c", "cp in/data.bin out.bin && ls -n out.bin"])
    assert verdict(result) == "ok", out
    assert " 1000 " in out, "files belong to the sandbox's user"
    archive = engine_client.get_files(box.id, "/sandbox/work/out.bin")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = next(m for m in tar.getmembers() if m.isfile())
        got = tar.extractfile(member)
        assert got is not None and got.read() == payload


def test_second_build_is_a_cache_hit(engine_client: SandboxClient) -> None:
    fragment = f"RUN echo {uuid.uuid4().hex} > /marker"
    first = engine_client.build_image(fragment)
    try:
        assert first.cache_hit is False
        second = engine_client.build_image(fragment + "\n")
        assert second.cache_hit is True
        assert second.image.key == first.image.key
        assert second.image.digest == first.image.digest, "no new image was made"
    finally:
        engine_client.delete_image(first.image.key)


def test_import_keeps_the_tag_and_labels(
    engine_name: str, base_image: str, config_factory: Callable[..., ServerConfig]
) -> None:
    """What `sandboxd bootstrap-image` relies on (Podman's import ignores the tag itself)."""
    engine = make_engine(config_factory(engine=engine_name))
    tag = f"sbx-import-{uuid.uuid4().hex[:8]}:v1"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    buf.seek(0)
    try:
        image = engine.import_image(buf, tag, {"sandbox.role": "probe"}, ['CMD ["/hello"]'])
        assert engine.image_id(tag) == image
        assert engine.image_labels(tag).get("sandbox.role") == "probe"
    finally:
        engine.remove_image(tag)
    assert engine.image_id(tag) is None


def test_next_start_reaps_a_killed_instance(
    engine_name: str,
    base_image: str,
    short_tmp: Path,
    config_factory: Callable[..., ServerConfig],
    write_config: Callable[..., Path],
) -> None:
    engine = make_engine(config_factory(engine=engine_name))
    procs: list[subprocess.Popen[bytes]] = []
    instances: list[str] = []

    def serve(name: str) -> str:
        config = write_config(pool_max_per_key=0)
        instances.append(config.read_text().split('"')[1])
        sock = short_tmp / f"{engine_name}-{name}.sock"
        argv = [SANDBOXD, "--engine", engine_name, "--config", str(config), "serve"]
        procs.append(subprocess.Popen([*argv, "--listen", f"unix:{sock}"]))
        assert wait_for(lambda: sock.exists() or procs[-1].poll() is not None, 20)
        assert procs[-1].poll() is None, "sandboxd serve exited"
        return f"unix:{sock}"

    try:
        with SandboxClient(serve("first"), retry_seconds=5) as c:
            c.wait_ready(timeout=20)
            for _ in range(2):
                c.create_sandbox(SandboxRequest(limits=requested_limits(memory_bytes=64 << 20)))
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(timeout=10)
        assert len(containers_of(engine, instances[0])) == 2, "kill -9 leaves them running"
        with SandboxClient(serve("second"), retry_seconds=5) as c:
            c.wait_ready(timeout=20)
            assert wait_for(lambda: not containers_of(engine, instances[0]), 20)
            assert c.list_sandboxes() == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=15)
        for instance in instances:
            for cid in containers_of(engine, instance):
                engine.remove_container(cid)


# -- where the engines differ -------------------------------------------------------------


def test_the_init_is_the_engines_own(
    engine_name: str, engine_client: SandboxClient, make_box: Callable[..., Sandbox]
) -> None:
    """Both reap zombies with an init of their own: tini (docker-init) or catatonit."""
    result, out = run(engine_client, make_box(), ["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"])
    assert verdict(result) == "ok", out
    expected = {"docker": "/sbin/docker-init", "podman": "/run/podman-init"}[engine_name]
    assert out.split()[0] == expected, out


def test_podman_gets_explicit_ulimits(
    engine_name: str, engine_client: SandboxClient, make_box: Callable[..., Sandbox]
) -> None:
    """Podman's default RLIMIT_NOFILE (1048576) is refused here; the adapter sets Docker's."""
    result, out = run(engine_client, make_box(), ["sh", "-c", "ulimit -n"])
    assert verdict(result) == "ok", out
    if engine_name == "podman":
        assert out.split() == ["1024"], out


def test_gvisor_is_docker_only(
    engine_name: str, engine_client: SandboxClient, make_box: Callable[..., Sandbox]
) -> None:
    """Podman 4.3's API ignores the runtime asked for: runsc is refused, never faked."""
    if engine_name == "podman":
        with pytest.raises(errors.InvalidArgument, match="'runsc' is not registered"):
            make_box(runtime="runsc")
        with pytest.raises(errors.PermissionDenied, match="needs runtime 'runsc'"):
            make_box(profile="untrusted")
        return
    box = make_box(runtime="runsc", memory=128 * MiB)
    result, out = run(engine_client, box, ["sh", "-c", "dmesg | head -1"])
    assert verdict(result) == "ok", out
    assert "gVisor" in out, out


def test_podman_adapter_refuses_another_runtime(engine_name: str, base_image: str) -> None:
    """The adapter's own guard, for callers that skip the service's runtime check."""
    if engine_name != "podman":
        return
    spec = ContainerSpec(image=base_image, name=f"sbx-{uuid.uuid4().hex[:8]}", labels={})
    with pytest.raises(errors.FailedPrecondition, match="not available with Podman"):
        PodmanEngine().create_container(replace(spec, runtime="runsc"))
