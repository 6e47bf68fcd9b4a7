"""Code that tries to get out: network, host files, privileges, outliving its sandbox.

No test here sends a packet anywhere: the network checks look at the interfaces and the
routing table from inside.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from abuse import inspect, run, verdict

from sandboxd.api import Sandbox
from sandboxd.client import SandboxClient

Box = Callable[..., AbstractContextManager[Sandbox]]

NETWORK = """
import json, os
try:
    names = sorted(os.listdir("/sys/class/net"))
except OSError:
    names = None  # gVisor has no /sys/class/net
dev = [line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]]
routes = [line for line in open("/proc/net/route").read().splitlines()[1:] if line.strip()]
try:
    routes6 = [l for l in open("/proc/net/ipv6_route").read().splitlines() if " lo" not in l]
except OSError:
    routes6 = []
print(json.dumps({"sys": names, "dev": sorted(dev), "routes": routes, "routes6": routes6}))
"""

HOST_FILES = """
import json, os
out = {}
try:
    out["shadow"] = open("/etc/shadow", "rb").read().hex()
except OSError as e:
    out["shadow"] = e.__class__.__name__
out["sockets"] = [p for p in ("/var/run/docker.sock", "/run/docker.sock",
    "/run/containerd/containerd.sock") if os.path.exists(p)]
out["mounts"] = open("/proc/self/mountinfo").read()
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
found = []
for top in ("/tmp", "/sandbox", "/home", "/root", "/var", "/opt"):
    for dirpath, dirs, files in os.walk(top):
        for f in files:
            try:
                if SECRET in open(os.path.join(dirpath, f), "rb").read(1 << 20):
                    found.append(os.path.join(dirpath, f))
            except OSError:
                pass
out["found"] = found
print(json.dumps(out))
"""

PRIVILEGES = r"""
import ctypes, errno, json, os, socket, subprocess
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "succeeded"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
def syscall_check(rc):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
os.makedirs("/tmp/m", exist_ok=True)
attempt("mount", lambda: syscall_check(libc.mount(b"none", b"/tmp/m", b"tmpfs", 0, None)))
attempt("chroot", lambda: os.chroot("/tmp"))
attempt("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("packet_socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("setuid", lambda: os.setuid(0))
# finit_module(fd, params, flags): the capability is checked before the fd.
attempt("kernel_module", lambda: syscall_check(libc.syscall(313, -1, b"", 0)))
def write(path):
    with open(path, "w") as f:
        f.write("h")
attempt("sysrq", lambda: write("/proc/sysrq-trigger"))
attempt("sys_write", lambda: write("/sys/kernel/uevent_helper"))
attempt("sys_fs_cgroup", lambda: write("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
out["cap_eff"] = status["CapEff"].strip()
out["cap_bnd"] = status["CapBnd"].strip()
out["no_new_privs"] = status.get("NoNewPrivs", "").strip()
out["seccomp"] = status.get("Seccomp", "").strip()
out["uid"] = os.getuid()
# A setuid-root program stays unprivileged: no_new_privs keeps its bit from taking effect.
r = subprocess.run(["mount", "-t", "tmpfs", "none", "/tmp/m"], capture_output=True, text=True)
out["setuid_mount"] = [r.returncode, r.stderr.strip()]
print(json.dumps(out))
"""


ALLOWED_MOUNTS = (
    "/",
    "/tmp",
    "/sandbox/work",
    "/etc/resolv.conf",
    "/etc/hostname",
    "/etc/hosts",
    "/usr/sbin/docker-init",
)
# The base image has no ps: count processes whose argv is exactly the given words.
COUNT_ARGV = """
import os, sys
want = sys.argv[1:]
n = 0
for p in os.listdir("/proc"):
    try:
        if p.isdigit() and open(f"/proc/{p}/cmdline", "rb").read().split(b"\\0")[:-1] == [
            w.encode() for w in want
        ]:
            n += 1
    except OSError:
        pass
print(n)
"""


def _json(out: bytes) -> dict[str, object]:
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_network_has_only_loopback_and_no_route(
    operator: SandboxClient, box: Box, runtime: str
) -> None:
    with box() as sandbox:
        out, err, result = run(operator, sandbox.id, NETWORK, argv0="python3")
        assert verdict(result) == "ok", (result, err)
        seen = _json(out)
        assert seen["dev"] == ["lo"], seen
        assert seen["sys"] in (["lo"], None), seen
        assert seen["routes"] == [] and seen["routes6"] == [], seen
        info = inspect(sandbox.container_id) or {}
        assert info["HostConfig"]["NetworkMode"] == "none"  # type: ignore[index]


def test_host_files_engine_socket_and_other_sandboxes_are_out_of_reach(
    operator: SandboxClient, box: Box, runtime: str
) -> None:
    secret = secrets.token_hex(16)
    host_shadow = Path("/etc/shadow").read_bytes()
    with box() as other, box() as sandbox:
        # Another sandbox holds the secret in its files and in a running process's argv.
        plant = f"echo {secret} > /tmp/s; echo {secret} > s; "
        plant += f"nohup sh -c 'sleep 30' {secret} >/dev/null 2>&1 &"
        _, _, planted = run(operator, other.id, plant)
        assert verdict(planted) == "ok", planted
        script = HOST_FILES.replace("SECRET", repr(secret.encode()))
        out, err, result = run(operator, sandbox.id, script, argv0="python3")
        assert verdict(result) == "ok", (result, err)
        seen = _json(out)
        assert (
            seen["shadow"] in ("PermissionError",)
            or bytes.fromhex(str(seen["shadow"])) != host_shadow
        ), "the host's /etc/shadow is readable"
        assert seen["sockets"] == [], seen["sockets"]
        mounts = str(seen["mounts"])
        assert "docker.sock" not in mounts and "containerd" not in mounts, mounts
        # Besides the scratch dirs, only the engine's own: per-container resolv.conf, hostname
        # and hosts, and its init binary (read-only).
        for line in mounts.splitlines():
            target = line.split()[4]
            assert target in ALLOWED_MOUNTS or target.startswith(("/proc", "/dev", "/sys")), line
        assert seen["found"] == [], seen["found"]
        # Its own processes only: init, sleep infinity, and this python.
        assert len(seen["pids"]) <= 4, seen["pids"]  # type: ignore[arg-type]


def test_no_privileges_no_capabilities_no_kernel_interfaces(
    operator: SandboxClient, box: Box, runtime: str
) -> None:
    with box() as sandbox:
        out, err, result = run(operator, sandbox.id, PRIVILEGES, argv0="python3")
        assert verdict(result) == "ok", (result, err)
        seen = _json(out)
        denied = ("EPERM", "EACCES", "EROFS", "ENOENT", "ENOSYS", "EINVAL")
        for name in ("mount", "chroot", "raw_socket", "packet_socket", "setuid", "kernel_module",
                     "sysrq", "sys_write", "sys_fs_cgroup"):  # fmt: skip
            assert seen[name] in denied, (name, seen[name])
        assert seen["uid"] == 65534
        assert seen["cap_eff"] == "0000000000000000", seen
        assert seen["cap_bnd"] == "0000000000000000", seen
        code, message = seen["setuid_mount"]  # type: ignore[misc]
        assert code != 0, message
        info = inspect(sandbox.container_id) or {}
        host = info["HostConfig"]  # type: ignore[index]
        assert host["Privileged"] is False and host["CapDrop"] == ["ALL"]
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert not any("unconfined" in opt for opt in host["SecurityOpt"] or [])
        assert host["ReadonlyRootfs"] is True
        assert host["Binds"] in (None, []) and not info["Mounts"]
        assert host["Runtime"] == runtime
        if runtime == "runc":
            # Docker's default seccomp profile is in force (gVisor filters in its own kernel
            # and reports 0 here).
            assert seen["no_new_privs"] == "1" and seen["seccomp"] == "2", seen


def test_background_process_dies_with_the_sandbox(
    operator: SandboxClient, box: Box, runtime: str
) -> None:
    marker = str(1000 + secrets.randbelow(8000))
    with box() as sandbox:
        script = f"nohup sleep {marker} >/dev/null 2>&1 & echo started"
        out, _, result = run(operator, sandbox.id, script)
        assert verdict(result) == "ok" and out.strip() == b"started", result
        assert result.wall_seconds < 5
        still = b""
        for _ in range(20):  # nohup has to exec sleep first
            still, _, _ = run(
                operator, sandbox.id, COUNT_ARGV, argv0="python3", args=["sleep", marker]
            )
            if still.strip() == b"1":
                break
        assert still.strip() == b"1", "the background process should still run in the sandbox"
    # `box` checked the container and its init are gone; no host process carries the marker
    # (under gVisor the guest's processes never were host processes).
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = status.read_bytes().split(b"\0")
        except OSError:
            continue
        assert args[:2] != [b"sleep", marker.encode()], status


def test_killing_pid_1_inside(operator: SandboxClient, box: Box, runtime: str) -> None:
    with box() as sandbox:
        script = "kill -KILL 1; kill -TERM 1; kill -INT 1; kill -HUP 1; sleep 1; echo after"
        _, _, result = run(operator, sandbox.id, script, timeout=10.0)
        # Either init ignores the signals and the sandbox lives on, or the sandbox ends and
        # the service says so; never a hang, never a pass that hides a dead sandbox.
        assert verdict(result) in ("ok", "crashed", "nonzero_exit"), result
        assert result.wall_seconds < 10
        try:
            out, _, again = run(operator, sandbox.id, "echo alive")
        except Exception as exc:  # the sandbox ended: the service refuses cleanly
            assert "no longer running" in str(exc) or "not running" in str(exc), exc
        else:
            assert verdict(again) == "ok" and out == b"alive\n", again
