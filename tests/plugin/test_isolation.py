"""The leak suite: every kind of state a test can leave in its sandbox is gone for the next.

Pairs of tests, run with one job so that under isolation="fork" the pair shares a
container: the first leaves something behind, the second checks it is gone. The
same file runs under isolation="container", where every test has its own container.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

LEAKS = r'''
import ctypes, ctypes.util, os, resource, shutil, signal, socket, subprocess, sys, threading, time
import pytest

pytestmark = pytest.mark.sandbox(memory="384m", pids=64, timeout=15)

STATE = []
PLACES = ["/tmp", os.environ["HOME"], "/dev/shm", "/var/tmp", "/run/lock"]
PORT = 47113


@pytest.fixture(autouse=True)
def container(record_property):
    # pid 1's start time tells containers apart (the hostname is always "sandbox").
    with open("/proc/1/stat") as f:
        record_property("container", f.read().rsplit(")", 1)[1].split()[19])


def spawn(name, *args, program=shutil.which("sleep")):
    """A process whose command line starts with `name` (all of ours start with leak-)."""
    return subprocess.Popen([name, *args], executable=program)


def others():
    """Processes other than pid 1, the container's command, the worker and this test."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in mine:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
            if "leak" in cmd:
                found.append(cmd)
    return found


def test_leave_files():
    for place in PLACES:
        if os.access(place, os.W_OK):
            with open(os.path.join(place, "leak-file"), "w") as f:
                f.write("left behind")
            os.makedirs(os.path.join(place, "leak-dir", "deep"))
            os.chmod(os.path.join(place, "leak-dir"), 0o500)
    assert os.access("/tmp", os.W_OK) and os.access(os.environ["HOME"], os.W_OK)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    assert libc.mq_open(b"/leak-queue", os.O_CREAT | os.O_RDWR, 0o600, None) >= 0
    assert os.listdir("/dev/mqueue") == ["leak-queue"]

def test_files_are_gone():
    for place in PLACES + ["/dev/mqueue"]:
        if os.path.isdir(place):
            assert not [n for n in os.listdir(place) if n.startswith("leak")], place


def test_leave_processes():
    spawn("leak-background", "1000")
    middle = os.fork()
    if middle == 0:  # double-forked into a session of its own, its parent gone
        os.setsid()
        spawn("leak-double", "1001")
        os._exit(0)
    os.waitpid(middle, 0)
    code = "import time; b = bytearray(64 << 20); time.sleep(1000)"
    spawn("leak-memory", "-c", code, program=sys.executable)
    for _ in range(100):  # a new process shows its command line only after its exec
        if len(others()) == 3:
            break
        time.sleep(0.05)
    assert len(others()) == 3, others()

def test_processes_are_gone():
    assert others() == []


def test_leave_interpreter_state():
    os.environ["LEAK"] = "1"
    STATE.append("leak")
    socket.LEAK = True
    os.chdir("/tmp")
    os.umask(0o077)
    signal.signal(signal.SIGUSR1, lambda *a: None)
    resource.setrlimit(resource.RLIMIT_NOFILE, (77, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    threading.Thread(target=time.sleep, args=(1000,), name="leak-thread", daemon=True).start()

def test_interpreter_state_is_gone():
    assert "LEAK" not in os.environ and STATE == [] and not hasattr(socket, "LEAK")
    assert os.getcwd() != "/tmp"
    assert os.umask(0o022) == 0o022
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] != 77
    assert not [t for t in threading.enumerate() if t.name == "leak-thread"]


def test_leave_ipc():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    assert libc.shmget(0x1eaf, 1 << 20, 0o1600) >= 0  # IPC_CREAT | 0600
    assert libc.semget(0x1eaf, 1, 0o1600) >= 0
    assert libc.msgget(0x1eaf, 0o1600) >= 0
    with open("/proc/sysvipc/shm") as f:
        assert len(f.read().splitlines()) == 2

def test_ipc_is_gone():
    for kind in ("shm", "sem", "msg"):
        with open(f"/proc/sysvipc/{kind}") as f:
            assert f.read().splitlines()[1:] == [], kind


def test_leave_sockets():
    server = "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', %d)); s.listen(); "
    server += "u = socket.socket(socket.AF_UNIX); u.bind('\\0leak-socket'); u.listen(); "
    server += "time.sleep(1000)"
    spawn("leak-server", "-c", server % PORT, program=sys.executable)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise AssertionError("the server did not listen")

def test_sockets_are_gone():
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", PORT), timeout=1)
    u = socket.socket(socket.AF_UNIX)
    with pytest.raises(ConnectionRefusedError):
        u.connect("\0leak-socket")


def test_leave_a_full_scratch():
    with open("/tmp/leak-fill", "wb") as f:
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * (1 << 20))

def test_scratch_has_room():
    with open("/tmp/room", "wb") as f:
        f.write(b"\0" * (8 << 20))


def test_leave_what_a_reset_cannot_undo():
    os.chmod(os.environ["HOME"], 0o700)

def test_home_is_as_it_was():
    assert os.stat(os.environ["HOME"]).st_mode & 0o777 == 0o755


def test_leave_many_processes():
    while True:  # until the process limit refuses a fork
        spawn("leak-many", "1000")

def test_processes_after_the_pids_limit():
    assert others() == []
    subprocess.run(["true"], check=True)


def test_kill_everything():
    os.kill(-1, signal.SIGKILL)
    time.sleep(5)

def test_after_kill_everything():
    assert others() == []


def test_out_of_memory():
    print("before the allocation")
    hog = bytearray(512 << 20)

def test_after_out_of_memory():
    assert bytearray(64 << 20)


def test_timeout():
    spawn("leak-timeout", "1000")
    time.sleep(60)

def test_after_timeout():
    assert others() == []
'''

SAME_CONTAINER = [
    "test_leave_files",
    "test_files_are_gone",
    "test_leave_processes",
    "test_processes_are_gone",
    "test_leave_interpreter_state",
    "test_interpreter_state_is_gone",
    "test_leave_ipc",
    "test_ipc_is_gone",
    "test_leave_sockets",
    "test_sockets_are_gone",
    "test_leave_a_full_scratch",
    "test_scratch_has_room",
]


def run_in_one_slot(pytester: pytest.Pytester, isolation: str, *args: str) -> pytest.RunResult:
    """The file's tests in one job slot, in order, so that under fork they share a container."""
    return pytester.runpytest_subprocess(
        "--sandbox",
        "--sandbox-jobs=1",
        f"--sandbox-isolation={isolation}",
        "-p",
        "no:randomly",
        "--junitxml=out.xml",
        *args,
    )


def properties(pytester: pytest.Pytester) -> dict[str | None, dict[str | None, str | None]]:
    """Each test's recorded properties, from the run's JUnit XML."""
    suite = ET.parse(pytester.path / "out.xml").getroot()
    return {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in suite.iter("testcase")
    }


@pytest.mark.parametrize("isolation", ["fork", "container"])
def test_nothing_leaks_into_the_next_test(
    pytester: pytest.Pytester, no_leftovers: None, isolation: str
) -> None:
    pytester.makepyfile(test_leaks=LEAKS)
    result = run_in_one_slot(pytester, isolation, "-rA")
    result.stdout.fnmatch_lines_random(
        [
            "FAILED test_leaks.py::test_leave_many_processes - process limit (64) reached*",
            "FAILED test_leaks.py::test_kill_everything - sandbox crashed*",
            "FAILED test_leaks.py::test_out_of_memory - out of memory (limit 384 MiB)*",
            "FAILED test_leaks.py::test_timeout - timed out after 15.0s",
        ]
    )
    result.stdout.fnmatch_lines(["*Captured stdout call*", "before the allocation"])
    result.assert_outcomes(passed=18, failed=4)
    where = properties(pytester)
    containers = {where[name]["container"] for name in SAME_CONTAINER}
    if isolation == "fork":
        # The pairs really shared a container: the reset, not a new container, cleaned up.
        assert len(containers) == 1, containers
        assert where["test_leave_files"]["sandbox_isolation"] == "fork"
        # The check after the test found what the reset could not undo: a fresh container.
        after = where["test_home_is_as_it_was"]["container"]
        assert after != where["test_leave_what_a_reset_cannot_undo"]["container"]
    else:
        assert len(containers) == len(SAME_CONTAINER)


CLOCKS = r"""
import itertools, socket, time
import pytest

pytestmark = pytest.mark.sandbox(timeout=15)

# A project that moves the clock for all of its tests (freezegun's freeze_time(...,
# auto_tick_seconds=...).start() at import does this): every read jumps an hour. Only
# where the tests run (the sandbox's hostname): the host's collection keeps its clock.
if socket.gethostname() == "sandbox":
    _reads = itertools.count(1)
    time.monotonic = lambda: 3600.0 * next(_reads)
    time.time = lambda: 1.5e9 + 3600.0 * next(_reads)


@pytest.fixture(autouse=True)
def container(record_property):
    with open("/proc/1/stat") as f:
        record_property("container", f.read().rsplit(")", 1)[1].split()[19])


@pytest.mark.parametrize("n", range(4))
def test_reads_the_moved_clock(n):
    before = time.monotonic()
    time.sleep(0.3)  # the watchdog's thread runs meanwhile
    assert time.monotonic() > before + 3000
"""


@pytest.mark.parametrize("isolation", ["fork", "container"])
def test_a_clock_the_tests_move_is_not_the_watchdogs(
    pytester: pytest.Pytester, no_leftovers: None, isolation: str
) -> None:
    """The worker's timeout and recycling read a clock no test's time travel reaches."""
    pytester.makepyfile(test_clocks=CLOCKS)
    run_in_one_slot(pytester, isolation).assert_outcomes(passed=4)
    if isolation == "fork":  # no test made the exec's deadline look near: one container
        containers = {where["container"] for where in properties(pytester).values()}
        assert len(containers) == 1, containers
