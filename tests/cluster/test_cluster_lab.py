"""The cluster engine end to end, on a real multi-node lab (tests/cluster/lab.py).

Two nodes, each a network namespace with its own Docker engine and Ray node; the gateway
is `sandboxd serve` with `engine = "cluster"` on a unix socket. One lab serves the whole
module; node 1 is killed and restarted by the loss tests, which leave it running again.
After the module, nothing of the lab may be left on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "load")]

from lab import Lab, LabSpec  # noqa: E402
from lab_node import LabNode  # noqa: E402
from sandboxd_process import wait_until  # noqa: E402

from sandboxd.api import ExecResult, Sandbox, SandboxRequest, requested_limits  # noqa: E402
from sandboxd.client import SandboxClient  # noqa: E402
from sandboxd.errors import SandboxError  # noqa: E402
from sandboxd.limits import MiB  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ALLOCATE = "import sys; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096])"
#: Many short-lived `sleep`s from sh: the pids limit, far from the memory limit (forked
#: pythons would come close to 64 MiB, and on a slow node the OOM killer could fire first).
FORK_BOMB = "for i in $(seq 100); do sleep 5 & done; wait"
#: Each node offers 2 CPUs to Ray: two of these fill a node, so four use both.
ONE_CPU = requested_limits(cpus=1.0, memory_bytes=64 * MiB, pids=32, timeout_seconds=300.0)


def lab_prerequisites() -> None:
    """FAIL (never skip) when the machine lacks what the lab needs: setup installs it."""
    missing = [tool for tool in ("ip", "nsenter", "dockerd", "docker") if not shutil.which(tool)]
    try:
        import ray  # noqa: F401
    except ImportError:
        missing.append("ray (the `cluster` extra)")
    if os.geteuid() != 0:
        missing.append("root (network namespaces, dockerd)")
    if missing:
        pytest.fail(
            f"the cluster lab needs {', '.join(missing)}; run scripts/host-setup.sh",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def lab(base_image: str, instance_id_factory: Callable[[], str]) -> Iterator[Lab]:
    """One two-node lab for the module; afterwards nothing of it is left (asserted)."""
    lab_prerequisites()
    # Admission waits long: on a loaded 2-core machine a create may queue for a while.
    spec = LabSpec(base_image=base_image, gateway_settings={"admission_timeout_seconds": 120.0})
    lab = Lab(spec, instance_id=instance_id_factory())
    try:
        lab.start()
        yield lab
    finally:
        lab.close()
        assert lab.leftovers() == [], "the lab left these behind"


@pytest.fixture(scope="module")
def gw(lab: Lab) -> Iterator[SandboxClient]:
    client = SandboxClient(lab.gateway_address, retry_seconds=10.0)
    client.wait_ready(timeout=30.0)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def boxes(lab: Lab, gw: SandboxClient) -> Iterator[list[Sandbox]]:
    """Sandboxes a test made; all destroyed after it (those of a lost node included).

    A test that killed a node and failed before restarting it gets it restarted here,
    so the next test has the whole lab again.
    """
    made: list[Sandbox] = []
    yield made
    for node in lab.nodes:
        if not node.running():
            lab.restart_node(node.index)
    for box in made:
        # A sandbox of a lost node has nothing left to destroy.
        with contextlib.suppress(SandboxError):
            gw.destroy_sandbox(box.id)


def node_of(lab: Lab, box: Sandbox) -> LabNode:
    """The lab node whose engine runs the sandbox's container."""
    node = lab.node_of_container(box.container_id.split("@", 1)[0])
    assert node is not None, f"no node runs {box.container_id}"
    return node


def spread(gw: SandboxClient, lab: Lab, made: list[Sandbox]) -> dict[int, list[Sandbox]]:
    """Four one-CPU sandboxes: more than one node holds, so every node gets some."""
    by_node: dict[int, list[Sandbox]] = {}
    for _ in range(4):
        box = gw.create_sandbox(SandboxRequest(limits=ONE_CPU))
        made.append(box)
        by_node.setdefault(node_of(lab, box).index, []).append(box)
    return by_node


def run(
    gw: SandboxClient, box: Sandbox, argv: list[str], timeout: float = 30.0
) -> tuple[ExecResult, str]:
    out = bytearray()
    result = gw.exec(box.id, argv, on_output=lambda _, d: out.extend(d), timeout=timeout)
    return result, out.decode(errors="replace")


VERDICTS = [
    (["sh", "-c", "cat /proc/self/cgroup"], 30.0, "ok", ""),
    (["sleep", "30"], 1.0, "timed_out", "timed out after 1.0s"),
    (["sh", "-c", FORK_BOMB], 30.0, "pids_exhausted", "process limit (32) reached"),
    (["python3", "-c", ALLOCATE, "200"], 30.0, "out_of_memory", "out of memory (limit 64"),
]


def test_sandboxes_land_on_every_node_and_each_verdict_holds_there(
    lab: Lab, gw: SandboxClient, boxes: list[Sandbox]
) -> None:
    by_node = spread(gw, lab, boxes)
    assert sorted(by_node) == [0, 1], {i: [b.id for b in bs] for i, bs in by_node.items()}
    for index, on_node in sorted(by_node.items()):
        box = on_node[0]
        for argv, timeout, expected, message in VERDICTS:
            result, out = run(gw, box, argv, timeout=timeout)
            assert result.verdict == expected, (lab.nodes[index].name, argv, result, out)
            assert message in result.message, (lab.nodes[index].name, result.message)
            if expected == "ok":
                # The container's cgroup is under the node engine's own cgroup parent.
                assert f"/{lab.nodes[index].cgroup}/docker/" in out, out


def test_node_loss_ends_its_sandboxes_and_spares_the_others(
    lab: Lab, gw: SandboxClient, boxes: list[Sandbox]
) -> None:
    by_node = spread(gw, lab, boxes)
    doomed, spared = by_node[1][0], by_node[0][0]
    ended: dict[str, object] = {}

    def long_exec() -> None:
        try:
            ended["result"] = gw.exec(doomed.id, ["sleep", "200"], timeout=240.0)
        except SandboxError as exc:
            ended["error"] = exc

    caller = threading.Thread(target=long_exec, daemon=True)
    caller.start()
    doomed_cid = doomed.container_id.split("@", 1)[0]
    lost = {
        lab.nodes[1].docker("inspect", "--format", "{{.Id}}", b.container_id.split("@")[0]).strip()
        for b in by_node[1]
    }
    running = lambda: "sleep" in lab.nodes[1].docker("top", doomed_cid, check=False)  # noqa: E731
    assert wait_until(lambda: running() or not caller.is_alive(), 120), "the exec did not start"
    assert caller.is_alive(), f"the exec ended before the node was lost: {ended}"
    lab.kill_node(1)
    caller.join(timeout=120.0)  # a hang guard, not a timing assertion
    assert not caller.is_alive(), "the exec on the lost node did not end"
    assert "was lost" in str(ended.get("error")), ended
    with pytest.raises(SandboxError, match="was lost"):
        gw.exec(doomed.id, ["true"], timeout=30.0)

    # The other node's sandboxes go on, and new ones are placed where there is room
    # (node 0 is full: one of its sandboxes makes way).
    assert run(gw, spared, ["true"])[0].verdict == "ok"
    gw.destroy_sandbox(by_node[0][1].id)
    fresh = gw.create_sandbox(
        SandboxRequest(limits=requested_limits(cpus=0.5, memory_bytes=64 * MiB))
    )
    boxes.append(fresh)
    assert node_of(lab, fresh).index == 0
    assert run(gw, fresh, ["true"])[0].verdict == "ok"

    restart_and_check_reaped(lab, gw, boxes, lost)


def restart_and_check_reaped(
    lab: Lab, gw: SandboxClient, boxes: list[Sandbox], lost: set[str]
) -> None:
    """Restart node 1; once a sandbox is placed there again, none of the `lost` is left."""
    node = lab.nodes[1]
    node.start_engine()
    assert lost <= set(node.containers()), "the killed node's containers should be on its disk"
    lab.join_ray([node], head=False)
    # Fill node 0 so that the next sandbox must go to the restarted node.
    for _ in range(6):
        box = gw.create_sandbox(SandboxRequest(limits=ONE_CPU))
        boxes.append(box)
        if node_of(lab, box).index == 1:
            break
    else:
        pytest.fail("no sandbox was placed on the restarted node")
    assert wait_until(lambda: not lost & set(node.containers()), 60), (
        "the lost sandboxes' containers were not reaped after the node came back"
    )


#: A `sleep` process the lab can see in a node's containers while a test runs.
DEMO_SLEEP = "sleep 4.5"
#: Eight tests of one CPU each; they record the node's cgroup parent (the lab's
#: `LabNode.cgroup`), which the container sees in /proc/self/cgroup on cgroup v1.
DEMO_TESTS = f"""
import subprocess

import pytest


def cgroup_parent():
    for line in open("/proc/self/cgroup"):
        parts = line.strip().split(":", 2)[2].strip("/").split("/")
        if "docker" in parts:
            return "/".join(parts[: parts.index("docker")])
    return "unknown"


@pytest.mark.parametrize("n", range(8))
@pytest.mark.sandbox(cpus=1.0, memory="128m", timeout=120)
def test_spread(n, record_property):
    record_property("node", cgroup_parent())
    subprocess.run({DEMO_SLEEP.split()!r}, check=True)
"""


@pytest.fixture
def demo_junit(pytester: pytest.Pytester, minimal_environment: Callable[[Path], None]) -> Path:
    """The demo project, the same for every run so later runs find its image built; the
    path of its junit report.

    Its environment is pytest alone: the lab's engines start empty, and the mirrored
    virtualenv (ray included) took minutes to build on one node and send to the other.
    """
    minimal_environment(pytester.path)
    pytester.makepyfile(test_demo=DEMO_TESTS)
    return pytester.path / "junit.xml"


def nodes_in(junit: Path) -> dict[str, str]:
    """Test name -> the node it ran on, from the junit properties the tests recorded."""
    found: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        for prop in case.iter("property"):
            if prop.get("name") == "node":
                found[case.get("name", "")] = prop.get("value", "")
    return found


def test_pytest_through_the_gateway_spreads_tests_over_the_nodes(
    lab: Lab, pytester: pytest.Pytester, demo_junit: Path
) -> None:
    junit = demo_junit
    result = pytester.runpytest_subprocess(
        "--sandbox", "--sandbox-address", lab.gateway_address, "--sandbox-jobs", "4",
        f"--junitxml={junit}", "-p", "no:cacheprovider", timeout=600,
    )  # fmt: skip
    result.assert_outcomes(passed=8)
    ran_on = nodes_in(junit)
    assert set(ran_on.values()) == {n.cgroup for n in lab.nodes}, ran_on


def test_pytest_session_survives_a_node_lost_mid_run(
    lab: Lab,
    gw: SandboxClient,
    pytester: pytest.Pytester,
    boxes: list[Sandbox],
    demo_junit: Path,
) -> None:
    """Two jobs, one per node; node 1 dies while one of its tests runs.

    Ballast sandboxes leave one CPU free on each node, so the two one-CPU jobs land on
    different nodes whatever Ray's placement prefers; node 0's ballast is destroyed as
    node 1 is killed, so node 0 has room for the job that lost its sandbox.
    """
    junit = demo_junit
    by_node = spread(gw, lab, boxes)
    for on_node in by_node.values():
        gw.destroy_sandbox(on_node.pop().id)
    ballast = by_node[0][0]
    node = lab.nodes[1]
    mine = f"label=sandbox.instance={lab.instance_id}"
    lost: set[str] = set()

    def testing_there() -> bool:
        running = node.containers(mine, "status=running")
        return any(DEMO_SLEEP in node.docker("top", c, check=False) for c in running)

    def kill_once_a_test_runs_there() -> None:
        if wait_until(testing_there, 600):  # the first run builds the image
            lost.update(node.containers(mine))
            lab.kill_node(1)
            gw.destroy_sandbox(ballast.id)

    killer = threading.Thread(target=kill_once_a_test_runs_there, daemon=True)
    killer.start()
    result = pytester.runpytest_subprocess(
        "--sandbox", "--sandbox-address", lab.gateway_address, "--sandbox-jobs", "2",
        f"--junitxml={junit}", "-p", "no:cacheprovider", "-rf", timeout=600,
    )  # fmt: skip
    killer.join(timeout=630)
    assert lost, "no test ran on node 1 before the session ended"
    outcomes = result.parseoutcomes()
    failed, passed = outcomes.get("failed", 0), outcomes.get("passed", 0)
    assert failed >= 1 and failed + passed == 8, result.stdout.str()[-4000:]
    failures = [line for line in result.outlines if line.startswith("FAILED")]
    assert len(failures) == failed, failures
    # The summary lines are cut to the terminal's width: the reasons are read in full.
    reasons = [line for line in result.outlines if line.startswith("sandbox error:")]
    assert len(reasons) >= failed and all("was lost" in r for r in reasons), reasons
    restart_and_check_reaped(lab, gw, boxes, lost)
