"""Inside one sandbox: image volumes stay within the limits, a killed exec takes what it
started along, and the engine's internals stay out of what a client reads (issue 11,
findings 8, 9 and 11)."""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Iterator

import pytest
from abuse import inspect, run, suite_limits
from test_abuse_limits import MEMORY_BOMB

from sandboxd.api import SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.limits import MiB

LONG_ID = re.compile(rb"[0-9a-f]{64}")


@pytest.fixture(scope="module")
def volume_image(base_image: str) -> Iterator[str]:
    """An image that declares volumes, as any image from elsewhere may."""
    tag = f"sandbox-test/volumes:{secrets.token_hex(4)}"
    dockerfile = f"FROM {base_image}\nVOLUME /data /sandbox/work/inner\n"
    subprocess.run(
        ["docker", "build", "-q", "-t", tag, "-"],
        input=dockerfile.encode(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield tag
    subprocess.run(["docker", "rmi", "-f", tag], check=False, capture_output=True, timeout=60)


def test_declared_volumes_stay_within_the_scratch_limit(
    operator: SandboxClient, volume_image: str, runtime: str
) -> None:
    """Finding 8: VOLUME gave the container an anonymous volume on the host's disk, where
    48 MiB fitted although the scratch limit was 16 MiB."""
    spec = SandboxRequest(
        image=volume_image, profile="untrusted", runtime=runtime, limits=suite_limits()
    )
    sandbox = operator.create_sandbox(spec)
    try:
        mounts = (inspect(sandbox.container_id) or {}).get("Mounts") or []
        assert [m for m in mounts if m.get("Type") == "volume"] == [], mounts  # type: ignore[union-attr]
        for path in ("/data", "/sandbox/work/inner"):
            script = f"dd if=/dev/zero of={path}/big bs=1M count=48 2>&1; wc -c < {path}/big"
            out, _, _ = run(operator, sandbox.id, script)
            assert b"No space left on device" in out, out
            assert int(out.split()[-1]) <= 16 * MiB, out
    finally:
        operator.destroy_sandbox(sandbox.id)


def test_a_memory_kill_reads_without_engine_internals(
    operator: SandboxClient, runtime: str
) -> None:
    """Finding 11: under runsc an OOM-killed exec's stderr carried gVisor's internal error
    with the 64-hex container id (most times, not always: three tries)."""
    spec = SandboxRequest(
        profile="untrusted", runtime=runtime, limits=suite_limits(memory_bytes=64 * MiB)
    )
    for _ in range(3):
        sandbox = operator.create_sandbox(spec)
        try:
            out, err, result = run(operator, sandbox.id, MEMORY_BOMB, argv0="python3", timeout=10.0)
            assert result.verdict == "out_of_memory", result
            assert result.message == "out of memory (limit 64 MiB)"
            for text in (out, err, result.message.encode()):
                assert not LONG_ID.search(text), text
                assert b"urpc" not in text and b"containerManager" not in text, text
        finally:
            operator.destroy_sandbox(sandbox.id)


# Leaves two spinners in a new session with an empty environment, then waits to be killed.
DETACH = (
    "setsid sh -c '"
    'env -i sh -c "while :; do :; done" & env -i sh -c "while :; do :; done" &'
    "' & sleep 60"
)
# Spinners still running (this script's own command line names the loop too: not counted).
SPINNERS = (
    "n=0; for d in /proc/[0-9]*; do [ ${d#/proc/} = $$ ] && continue; "
    "grep -qs 'while :' $d/cmdline && n=$((n+1)); done; echo $n"
)


def test_a_timed_out_exec_takes_its_detached_processes_along(
    operator: SandboxClient, runtime: str
) -> None:
    """Finding 9: a setsid + double fork that dropped its environment outlived the exec's
    timeout, and the next exec was billed for its CPU. The sandbox's preloaded command and
    what an earlier exec left running on purpose stay."""
    spec = SandboxRequest(
        profile="untrusted",
        runtime=runtime,
        limits=suite_limits(),
        preload_argv=["sh", "-c", "cat > /dev/null; echo preload-alive"],
    )
    sandbox = operator.create_sandbox(spec)
    try:
        run(operator, sandbox.id, "nohup sleep 300 > /dev/null 2>&1 &")
        _, _, result = run(operator, sandbox.id, DETACH, timeout=2.0)
        assert result.verdict == "timed_out", result
        out, _, _ = run(operator, sandbox.id, SPINNERS)
        assert out.strip() == b"0", out
        _, _, after = run(operator, sandbox.id, "sleep 1")
        assert after.cpu_seconds < 0.5, after  # its own (~0.02 s), not the spinners'
        out, _, _ = run(operator, sandbox.id, "grep -l 'sleep 300' /proc/[0-9]*/cmdline | wc -l")
        assert int(out) >= 1, out  # the earlier exec's background job (the grep may count too)
        got = bytearray()
        attached = operator.exec(
            sandbox.id, [], attach_preload=True, stdin=b"x", on_output=lambda _, d: got.extend(d)
        )
        assert attached.verdict == "ok" and bytes(got) == b"preload-alive\n", (attached, got)
    finally:
        operator.destroy_sandbox(sandbox.id)
