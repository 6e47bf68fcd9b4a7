"""After `kill -9` of `sandboxd serve`, the next start removes what it left."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sandboxd_cli import SANDBOXD, wait_for

from sandboxd.api import SandboxRequest, requested_limits
from sandboxd.client import SandboxClient


def containers_of(instance_id: str) -> list[str]:
    return subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=sandbox.instance={instance_id}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


@pytest.fixture
def serve(
    short_tmp: Path, write_config: Callable[..., Path]
) -> Iterator[Callable[[str], tuple[subprocess.Popen[bytes], str, str]]]:
    """Factory: start `sandboxd serve` on a unix socket; returns (process, address, instance)."""
    procs: list[subprocess.Popen[bytes]] = []
    instances: list[str] = []

    def start(name: str) -> tuple[subprocess.Popen[bytes], str, str]:
        config = write_config(pool_max_per_key=0)
        instance = next(
            line.split('"')[1] for line in config.read_text().splitlines() if "instance_id" in line
        )
        sock = short_tmp / f"{name}.sock"
        proc = subprocess.Popen(
            [SANDBOXD, "--config", str(config), "serve", "--listen", f"unix:{sock}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        instances.append(instance)
        assert wait_for(lambda: sock.exists() or proc.poll() is not None, 20), "no socket"
        assert proc.poll() is None, f"sandboxd serve exited with {proc.returncode}"
        return proc, f"unix:{sock}", instance

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for instance in instances:  # whatever a failed test left
        for cid in containers_of(instance):
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True, check=False)


def test_next_start_removes_sandboxes_of_a_killed_instance(
    base_image: str, serve: Callable[[str], tuple[subprocess.Popen[bytes], str, str]]
) -> None:
    first, address, _ = serve("first")
    with SandboxClient(address, retry_seconds=5) as c:
        c.wait_ready(timeout=20)
        boxes = [
            c.create_sandbox(SandboxRequest(limits=requested_limits(memory_bytes=64 << 20)))
            for _ in range(2)
        ]
        listed = {s.id: s for s in c.list_sandboxes()}
    assert set(listed) == {b.id for b in boxes}
    labels = subprocess.run(
        [
            "docker",
            "inspect",
            "--format",
            '{{index .Config.Labels "sandbox.instance"}}',
            boxes[0].container_id,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    old_instance = labels.stdout.strip()
    assert len(containers_of(old_instance)) == 2

    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    # Checked at once: any other instance starting on this engine would reap them too.
    assert len(containers_of(old_instance)) == 2, "kill -9 leaves the sandboxes running"

    _, address2, new_instance = serve("second")
    assert new_instance != old_instance
    assert wait_for(lambda: not containers_of(old_instance), 20), containers_of(old_instance)
    with SandboxClient(address2, retry_seconds=5) as c:
        c.wait_ready(timeout=20)
        assert c.list_sandboxes() == []
