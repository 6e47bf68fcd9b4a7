"""Helpers of the abuse suite: small limits, running scripts, and the after-checks."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sandboxd.api import ExecResult, requested_limits
from sandboxd.client import SandboxClient
from sandboxd.limits import Limits, MiB
from sandboxd.server import Service

RUNTIMES = ("runc", "runsc")
#: The tag the suite's service config lists in `public_images`.
PUBLIC_IMAGE = "sandbox-test/public:1"


@dataclass(frozen=True)
class SecureService:
    service: Service
    unix: str
    tcp: str
    tokens: dict[str, str]  # client name -> token


def docker_json(*args: str) -> object | None:
    """`docker ... --format json` output, None when the command fails (e.g. no such object)."""
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def inspect(container_id: str) -> dict[str, object] | None:
    data = docker_json("inspect", "--type", "container", container_id)
    return data[0] if isinstance(data, list) and data else None


def suite_limits(**overrides: object) -> Limits:
    """Small limits: runsc on ptrace is slow, and CI has two cores."""
    values: dict[str, object] = {
        "cpus": 1.0,
        "memory_bytes": 128 * MiB,
        "pids": 64,
        "scratch_bytes": 16 * MiB,
        "timeout_seconds": 15.0,
        "output_bytes": 1 * MiB,
    }
    values.update(overrides)
    return requested_limits(**values)  # type: ignore[arg-type]


def host_is_fine(client: SandboxClient) -> None:
    """The host still starts processes promptly, has memory left, and the service answers."""
    started = time.monotonic()
    subprocess.run(["true"], check=True, timeout=10)
    assert time.monotonic() - started < 5, "the host took seconds to start a process"
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert int(meminfo["MemAvailable"].split()[0]) * 1024 > 256 * MiB
    assert client.health() == "SERVING"


def proc_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[19]


def assert_gone(client: SandboxClient, container_id: str, pid: int, start: str | None) -> None:
    """The container is gone from the engine and its init process from the host."""
    deadline = time.monotonic() + 15
    while inspect(container_id) is not None:
        assert time.monotonic() < deadline, f"container {container_id[:12]} still exists"
        time.sleep(0.2)
    if pid > 0:
        # Same pid with the same start time would be the same process still running.
        assert start is None or proc_start(pid) != start, f"host process {pid} outlived it"
    host_is_fine(client)


def run(
    client: SandboxClient,
    sandbox_id: str,
    script: str,
    *,
    argv0: str = "sh",
    args: Sequence[str] = (),
    **kw: object,
) -> tuple[bytes, bytes, ExecResult]:
    """Run `script` with sh -c (or python3 -c); return (stdout, stderr, result)."""
    out = {"stdout": bytearray(), "stderr": bytearray()}
    result = client.exec(
        sandbox_id,
        [argv0, "-c", script, *args],
        on_output=lambda s, d: out[s].extend(d),
        **kw,  # type: ignore[arg-type]
    )
    return bytes(out["stdout"]), bytes(out["stderr"]), result


def verdict(result: ExecResult) -> str:
    return result.verdict
