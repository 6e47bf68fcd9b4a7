"""Code that tries to starve the host: every limit holds and is named in the verdict."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from abuse import run, verdict

from sandboxd.api import Sandbox
from sandboxd.client import SandboxClient
from sandboxd.limits import MiB

Box = Callable[..., AbstractContextManager[Sandbox]]

# Every process forks until a fork fails, then dies of the error; whatever is left stops
# after 3 s, so the sandbox is usable again soon after (under gVisor a fork takes ~13 ms
# and the survivors would otherwise keep the process table full for a long time).
FORK_BOMB = """
import os, time
end = time.monotonic() + 3
while time.monotonic() < end:
    os.fork()
"""

MEMORY_BOMB = """
chunks = []
while True:
    chunks.append(bytearray(8 << 20))
"""

ZOMBIES = """
import os, sys, time
n = int(sys.argv[1])
for _ in range(n):
    if os.fork() == 0:
        os._exit(0)
# Children exit at once and are never waited for: they stay zombies until we exit.
# On a loaded machine some have not run yet: count until all are zombies (or 10 s).
def zombies():
    count = 0
    for pid in os.listdir("/proc"):
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                count += 1
        except (OSError, IndexError):
            pass
    return count
deadline = time.monotonic() + 10
while (found := zombies()) < n and time.monotonic() < deadline:
    time.sleep(0.2)
print(found)
"""

# The number of processes once it drops below 8 (init reaps at its own pace on a loaded
# machine), or after 10 s.
COUNT_PROCS = """
import os, time
deadline = time.monotonic() + 10
while (n := sum(p.isdigit() for p in os.listdir("/proc"))) >= 8 and time.monotonic() < deadline:
    time.sleep(0.2)
print(n)
"""
# Processes still running the spin loop (the base image has no ps).
SPINNERS = """
import os
print(sum(
    b"while True" in open(f"/proc/{p}/cmdline", "rb").read()
    for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()
))
"""
# The count once it drops below 8, or after 5 s.
# Forks sleeping children until a fork fails, reports how many it got, then reaps them.
FORK_UNTIL_REFUSED = """
import os, signal
kids, why = [], "never refused"
for _ in range(200):
    try:
        pid = os.fork()
    except OSError as exc:
        why = exc.strerror
        break
    if pid == 0:
        signal.pause()
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(len(kids), why)
"""

SETTLED_PROCS = """
import os, time
for _ in range(50):
    n = sum(p.isdigit() for p in os.listdir("/proc"))
    if n < 8:
        break
    time.sleep(0.1)
print(n)
"""


def test_fork_bomb_hits_the_process_limit(operator: SandboxClient, box: Box, runtime: str) -> None:
    with box(pids=32, memory_bytes=512 * MiB) as sandbox:
        _, err, result = run(operator, sandbox.id, FORK_BOMB, argv0="python3", timeout=8.0)
        if runtime == "runc":
            assert verdict(result) == "pids_exhausted", result
            assert "process limit (32) reached" in result.message
        else:
            # gVisor's kernel refuses the fork itself (RLIMIT_NPROC, per sandbox); the host's
            # pids cgroup, sized for gVisor's own threads, is never reached, so the service
            # sees the bomb fail rather than the cgroup fill.
            assert verdict(result) == "nonzero_exit", result
            assert b"Resource temporarily unavailable" in err
        # The sandbox is still usable, and the bomb's last processes die of their failed forks.
        for _ in range(10):  # starting the check needs a free process slot itself
            out, _, after = run(operator, sandbox.id, SETTLED_PROCS, argv0="python3")
            if verdict(after) == "ok":
                break
            time.sleep(0.5)
        assert verdict(after) == "ok", after
        assert int(out) < 8, out


def test_the_process_cap_holds_on_each_runtime(operator: SandboxClient, box: Box) -> None:
    """The cap itself, on runc (the pids cgroup) and on runsc (gVisor's RLIMIT_NPROC)."""
    with box(pids=32, memory_bytes=512 * MiB) as sandbox:
        out, _, result = run(operator, sandbox.id, FORK_UNTIL_REFUSED, argv0="python3")
        assert verdict(result) in ("ok", "pids_exhausted"), result
        kids, why = out.decode().split(" ", 1)
        assert why.strip() == "Resource temporarily unavailable", out
        # The forking process and the sandbox's init hold slots too: fewer than 32 children,
        # yet most of the 32 (a cap that bit far too early would be a bug as well).
        assert 16 <= int(kids) < 32, out


def test_memory_bomb_is_out_of_memory(operator: SandboxClient, box: Box, runtime: str) -> None:
    with box(memory_bytes=64 * MiB) as sandbox:
        _, _, result = run(operator, sandbox.id, MEMORY_BOMB, argv0="python3", timeout=10.0)
        assert verdict(result) == "out_of_memory", result
        assert result.message == "out of memory (limit 64 MiB)"
    # Not zero: the bomb filled its limit before it was killed. (Under runsc the whole
    # sandbox dies with its cgroup; the service then reports the limit it was killed at.)
    assert 32 * MiB <= result.peak_memory_bytes <= 64 * MiB + 4 * MiB, result


def test_cpu_spin_is_timed_out_and_stopped(operator: SandboxClient, box: Box) -> None:
    with box(cpus=0.5) as sandbox:
        _, _, result = run(operator, sandbox.id, "while True: pass", argv0="python3", timeout=2.0)
        assert verdict(result) == "timed_out", result
        assert result.message == "timed out after 2.0s"
        assert result.wall_seconds < 6
        # Half a CPU: the cgroup, not the code, decides how much it got.
        assert 0.05 < result.cpu_seconds <= 0.5 * result.wall_seconds + 0.5, result
        out, _, _ = run(operator, sandbox.id, SPINNERS, argv0="python3")
        assert out.strip() == b"0", out


def test_filling_the_scratch_dir_stops_at_its_size(operator: SandboxClient, box: Box) -> None:
    with box(scratch_bytes=8 * MiB) as sandbox:
        script = "dd if=/dev/zero of=big bs=1M count=64 2>&1; echo rc=$?; wc -c < big"
        out, _, result = run(operator, sandbox.id, script)
        assert verdict(result) == "ok", result
        text = out.decode()
        assert "No space left on device" in text, text
        assert "rc=1" in text
        assert int(text.split()[-1]) <= 8 * MiB
        # /tmp has its own cap too, and the root is read-only.
        out, _, _ = run(
            operator, sandbox.id, "dd if=/dev/zero of=/tmp/big bs=1M count=64 2>&1; touch /x 2>&1"
        )
        assert b"No space left on device" in out, out
        # runc says the root is read-only; gVisor checks the permission first.
        assert b"Read-only file system" in out or b"Permission denied" in out, out


def test_100_mb_of_output_is_cut_at_the_cap(operator: SandboxClient, box: Box) -> None:
    with box(output_bytes=1 * MiB) as sandbox:
        out, err, result = run(operator, sandbox.id, "head -c 100000000 /dev/zero; sleep 30")
        assert verdict(result) == "output_truncated", result
        assert result.output_truncated
        assert len(out) + len(err) <= 1 * MiB
        assert result.wall_seconds < 10


def test_thousands_of_zombies_are_reaped_by_init(
    operator: SandboxClient, box: Box, runtime: str
) -> None:
    # A fork costs about 13 ms under gVisor's ptrace platform: fewer there, to stay quick.
    count = 3000 if runtime == "runc" else 400
    with box(pids=count + 50, memory_bytes=256 * MiB) as sandbox:
        out, err, result = run(
            operator, sandbox.id, ZOMBIES.replace("sys.argv[1]", str(count)), argv0="python3"
        )
        assert verdict(result) == "ok", (result, err[-500:])
        assert int(out) >= count, out
        # Their parent is gone: the sandbox's init reaped every one of them.
        after, _, _ = run(operator, sandbox.id, COUNT_PROCS, argv0="python3")
        assert int(after) < 8, after
