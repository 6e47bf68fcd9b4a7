"""What a command sees inside a default sandbox: locked down, measured honestly."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sandboxd_cli import CliResult

from sandboxd.api import Sandbox, SandboxRequest, requested_limits
from sandboxd.client import SandboxClient


@pytest.fixture(scope="module")
def box(client: SandboxClient) -> Iterator[Sandbox]:
    """One sandbox with the default profile, shared by the read-only checks below."""
    sandbox = client.create_sandbox(SandboxRequest(limits=requested_limits(memory_bytes=64 << 20)))
    try:
        yield sandbox
    finally:
        client.destroy_sandbox(sandbox.id)


def sh(client: SandboxClient, box: Sandbox, script: str) -> tuple[int, str]:
    out = bytearray()
    result = client.exec(
        box.id, ["sh", "-c", script], on_output=lambda _, d: out.extend(d), timeout=10
    )
    return result.exit_code, out.decode()


def test_only_loopback_interface(client: SandboxClient, box: Sandbox) -> None:
    code, out = sh(client, box, "ls /sys/class/net")
    assert code == 0, out
    assert out.split() == ["lo"]


def test_root_filesystem_is_read_only(client: SandboxClient, box: Sandbox) -> None:
    code, out = sh(client, box, "touch /probe 2>&1; echo rc=$?; grep ' / ' /proc/mounts")
    assert code == 0, out
    assert "Read-only file system" in out
    assert "rc=1" in out
    root_mount = [line for line in out.splitlines() if " / " in line]
    assert root_mount and " ro," in root_mount[0] + ",", root_mount


def test_tmp_and_workdir_are_writable(client: SandboxClient, box: Sandbox) -> None:
    code, out = sh(client, box, "echo x > /tmp/f && echo y > ./g && cat /tmp/f ./g && pwd")
    assert code == 0, out
    assert out.split() == ["x", "y", "/sandbox/work"]


def test_user_is_not_root(client: SandboxClient, box: Sandbox) -> None:
    code, out = sh(client, box, "id -u; id -g")
    assert code == 0
    uid, gid = (int(v) for v in out.split())
    assert uid != 0 and gid != 0


def test_no_capabilities_and_no_new_privileges(client: SandboxClient, box: Sandbox) -> None:
    code, out = sh(client, box, "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs):' /proc/self/status")
    assert code == 0, out
    fields = dict(line.split(":\t") for line in out.splitlines())
    assert int(fields["CapEff"], 16) == 0
    assert int(fields["CapPrm"], 16) == 0
    assert int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"


def test_an_init_reaps_zombies(client: SandboxClient, box: Sandbox) -> None:
    code, out = sh(client, box, "cat /proc/1/comm")
    assert code == 0
    assert out.strip() in ("docker-init", "tini"), out


def test_no_network_from_the_cli_either(cli: Callable[..., CliResult]) -> None:
    r = cli("run", "--json", "--", "ls", "/sys/class/net")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "lo"
    assert r.json()["limits"]["network"] is False
