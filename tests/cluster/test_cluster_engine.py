"""The cluster engine against a real multi-node Ray cluster on this host.

`tests/cluster/local_ray.py` starts two sandbox nodes (the head n1, and n2), each a raylet of
its own with `{"sandbox_node": 1}`, 2 CPU and 1 GiB; every node's agent drives the host's
Docker engine and labels its containers with its node name, so the nodes' containers stay
apart as if each node had an engine of its own. A gateway (`Service` with engine =
"cluster") serves on a unix socket. One cluster serves the whole module; the node-loss test
runs last, as it replaces node n2. Everything stays on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandboxd import cli
from sandboxd.api import SandboxRequest
from sandboxd.build_run import LABEL_BUILD
from sandboxd.client import SandboxClient
from sandboxd.engine.agent import LABEL_NODE
from sandboxd.engine.base import LABEL_INSTANCE
from sandboxd.engine.cluster import ClusterEngine
from sandboxd.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NodeLost,
    ResourceExhausted,
    SandboxError,
)
from sandboxd.limits import GiB, MiB
from sandboxd.server import Service, create_server
from tests.cluster.local_ray import LocalRay
from tests.conftest import docker, make_config, small_limits, wait_for
from tests.service.test_interactive import Reader

#: A build step's capabilities: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID.
BUILD_CAPS_MASK = 0xFB


@dataclass
class Lab:
    ray: LocalRay
    service: Service
    client: SandboxClient
    instance_id: str

    def short_id(self, name: str) -> str:
        return str(self.ray.nodes[name].node_id)[:12]


@pytest.fixture(scope="module")
def lab(base_image: str, short_tmp: Path) -> Iterator[Lab]:
    local = LocalRay()
    service: Service | None = None
    client: SandboxClient | None = None
    try:
        local.add_node("n2")
        config = make_config(
            engine="cluster",
            cluster_address=local.address,
            admission_timeout_seconds=4.0,
            cluster_call_timeout_seconds=10.0,
        )
        service, _ = create_server(config, f"unix:{short_tmp}/gateway.sock")
        client = SandboxClient(service.address, retry_seconds=5.0)
        client.wait_ready(timeout=60.0)
        yield Lab(local, service, client, config.instance_id)
    finally:
        if client is not None:
            client.close()
        if service is not None:
            service.stop(grace=2.0)
        local.shutdown()


def node_of(container_id: str) -> str:
    """The short Ray node id a cluster container id names."""
    return container_id.partition("@")[2]


def containers_labelled(instance_id: str, node: str) -> list[str]:
    out = docker(
        "ps", "-aq", "--filter", f"label={LABEL_INSTANCE}={instance_id}",
        "--filter", f"label={LABEL_NODE}={node}",
    )  # fmt: skip
    return out.stdout.split()


def one_cpu(**overrides: object) -> SandboxRequest:
    return SandboxRequest(limits=small_limits(cpus=1.0, **overrides))  # type: ignore[arg-type]


def collect(chunks: list[bytes]) -> Any:
    """An output callback that keeps the data."""
    return lambda stream, data: chunks.append(data)


def test_server_info_names_the_cluster_and_its_size(lab: Lab) -> None:
    info = lab.client.server_info(refresh=True)
    assert info.engine == "cluster"
    assert "2 nodes, 4 CPU, 2 GiB" in info.engine_version


def test_sandboxes_land_on_both_nodes_and_every_verdict_holds_on_each(lab: Lab) -> None:
    # Four 1-CPU sandboxes on two 2-CPU nodes: placement must use both.
    boxes = [lab.client.create_sandbox(one_cpu(memory_bytes=64 * MiB, pids=32)) for _ in range(4)]
    try:
        by_node = {node_of(b.container_id): b for b in boxes}
        assert len(by_node) == 2, [b.container_id for b in boxes]
        for box in by_node.values():
            run = lab.client.exec
            ok = run(box.id, ["sh", "-c", "echo hello"])
            assert ok.verdict == "ok" and ok.exit_code == 0
            slow = run(box.id, ["sleep", "30"], timeout=1.0)
            assert slow.verdict == "timed_out", slow
            hog = run(box.id, ["python3", "-c", "b = bytearray(256 << 20); print(len(b))"])
            assert hog.verdict == "out_of_memory", hog
            forks = run(box.id, ["sh", "-c", "for i in $(seq 100); do sleep 5 & done; wait"])
            assert forks.verdict == "pids_exhausted", forks
            assert ok.cpu_seconds is not None and hog.peak_memory_bytes
    finally:
        for box in boxes:
            lab.client.destroy_sandbox(box.id)


def test_files_and_stdin_travel_through_the_agent(lab: Lab) -> None:
    box = lab.client.create_sandbox(one_cpu())
    try:
        payload = os.urandom(3 << 20)
        lab.client.put_files(box.id, "/sandbox/work", {"blob.bin": payload})
        echoed = lab.client.exec(box.id, ["sha256sum", "blob.bin"])
        assert echoed.verdict == "ok"
        chunks: list[bytes] = []
        result = lab.client.exec(
            box.id, ["cat"], stdin=b"through the node\n" * 1000,
            on_output=lambda stream, data: chunks.append(data),
        )  # fmt: skip
        assert result.verdict == "ok"
        assert b"".join(chunks) == b"through the node\n" * 1000
        assert b"blob.bin" in lab.client.get_files(box.id, "/sandbox/work/blob.bin")
    finally:
        lab.client.destroy_sandbox(box.id)


def test_a_terminal_session_travels_through_the_agent(lab: Lab) -> None:
    box = lab.client.create_sandbox(one_cpu())
    try:
        session = lab.client.exec_session(box.id, ["/bin/sh"], tty=True, window=(24, 80))
        reader = Reader(session)
        session.write(b"stty size\n")
        reader.expect(b"24 80")
        session.resize(40, 120)
        session.write(b"stty size\n")
        reader.expect(b"40 120")
        session.write(b"exit 3\n")
        result = reader.finish()
        assert (result.exit_code, result.verdict) == (3, "nonzero_exit")
        script = "trap 'echo caught; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
        session = lab.client.exec_session(box.id, ["sh", "-c", script])
        reader = Reader(session)
        reader.expect(b"ready")
        session.signal("TERM")
        assert reader.finish().exit_code == 7
        assert b"caught" in reader.output
    finally:
        lab.client.destroy_sandbox(box.id)


def test_a_built_image_runs_on_every_node(lab: Lab) -> None:
    build = lab.client.build_image(fragment="RUN echo built-here > /etc/built")
    boxes = [
        lab.client.create_sandbox(
            SandboxRequest(image=build.image.key, limits=small_limits(cpus=1.0))
        )
        for _ in range(4)
    ]
    try:
        assert len({node_of(b.container_id) for b in boxes}) == 2
        for box in boxes:
            out: list[bytes] = []
            result = lab.client.exec(box.id, ["cat", "/etc/built"], on_output=collect(out))
            assert result.verdict == "ok" and b"".join(out) == b"built-here\n"
    finally:
        for box in boxes:
            lab.client.destroy_sandbox(box.id)


def test_build_steps_run_sandboxed_on_a_node_and_end_with_the_client(lab: Lab) -> None:
    label = f"label={LABEL_BUILD}={lab.instance_id}"
    failures: list[BaseException] = []

    def build() -> None:
        try:
            lab.client.build_image(
                f"RUN echo {uuid.uuid4().hex} && grep CapEff /proc/self/status && sleep 600",
                timeout=15.0,
            )
        except BaseException as exc:
            failures.append(exc)

    builder = threading.Thread(target=build)
    builder.start()
    try:
        assert wait_for(lambda: bool(docker("ps", "-q", "--filter", label).stdout.split()), 14)
        step = json.loads(docker("inspect", *docker("ps", "-q", "--filter", label).stdout.split())
                          .stdout)[0]  # fmt: skip
    finally:
        builder.join(timeout=60)
    limits = lab.service.config.defaults
    host = step["HostConfig"]
    assert (host["Memory"], host["PidsLimit"]) == (limits.memory_bytes, limits.pids)
    assert host["NanoCpus"] == int(limits.cpus * 1e9)
    assert host["CapDrop"] == ["ALL"] and len(host["CapAdd"]) == 7, host
    assert step["Config"]["Labels"][LABEL_NODE] in lab.ray.nodes, step["Config"]["Labels"]
    # The client's deadline ended the build on its node: no step container is left.
    assert [type(exc) for exc in failures] == [DeadlineExceeded], failures
    assert wait_for(lambda: not docker("ps", "-aq", "--filter", label).stdout.split(), 20.0)


def test_limits_above_every_node_are_refused_at_once(lab: Lab) -> None:
    with pytest.raises(InvalidArgument, match=r"largest node \(n[12]\) has 2 CPU and 1 GiB"):
        lab.client.create_sandbox(SandboxRequest(limits=small_limits(memory_bytes=2 * GiB)))
    with pytest.raises(InvalidArgument, match=r"limits\.cpus"):
        lab.client.create_sandbox(SandboxRequest(limits=small_limits(cpus=3.0)))


def test_a_request_no_node_has_room_for_waits_then_is_exhausted(lab: Lab) -> None:
    boxes = [lab.client.create_sandbox(one_cpu()) for _ in range(4)]
    try:
        with pytest.raises(ResourceExhausted, match="no node of the cluster had") as caught:
            lab.client.create_sandbox(one_cpu(), timeout=60.0)
        assert caught.value.retry_after
        # A call due sooner than the admission timeout (4 s) is answered within its own
        # deadline: RESOURCE_EXHAUSTED with a retry hint, not DEADLINE_EXCEEDED.
        with pytest.raises(ResourceExhausted, match="no node of the cluster had") as caught:
            lab.client.create_sandbox(one_cpu(), timeout=2.0)
        assert caught.value.retry_after
        lab.client.destroy_sandbox(boxes.pop().id)  # room again: the next one is placed
        boxes.append(lab.client.create_sandbox(one_cpu()))
    finally:
        for box in boxes:
            lab.client.destroy_sandbox(box.id)


def test_warm_sandboxes_give_way_to_a_live_one(lab: Lab, short_tmp: Path) -> None:
    config = make_config(
        engine="cluster",
        cluster_address=lab.ray.address,
        admission_timeout_seconds=30.0,
        pool_max_per_key=4,
        pool_idle_seconds=600.0,
    )
    service, _ = create_server(config, f"unix:{short_tmp}/pooled.sock")
    try:
        pool = service.core.manager.pool
        assert pool is not None
        for _ in range(4):  # four warm 1-CPU sandboxes take all of both nodes' CPUs
            service.core.manager.prewarm(one_cpu())
        assert wait_for(lambda: pool.stats()["ready"] == 4, timeout=120.0), pool.stats()
        with SandboxClient(service.address) as client:
            other = client.create_sandbox(one_cpu(memory_bytes=96 * MiB))
            client.destroy_sandbox(other.id)
        assert pool.stats()["ready"] < 4
    finally:
        service.stop(grace=2.0)


def test_a_node_whose_agent_died_gets_a_fresh_agent(lab: Lab) -> None:
    engine = lab.service.core.engine
    assert isinstance(engine, ClusterEngine)
    old = lab.client.create_sandbox(one_cpu())
    boxes = []
    try:
        node_id = engine.nodes.by_short_id(node_of(old.container_id)).node_id
        name = engine.nodes.name(node_id)
        os.kill(engine.nodes.facts(node_id)["pid"], signal.SIGKILL)  # the agent's worker
        for _ in range(2):  # the dead agent's sandbox stays lost
            with pytest.raises(NodeLost, match=f"node {name} was lost"):
                lab.client.exec(old.id, ["true"])
        # The node is up: its share of four new 1-CPU sandboxes lands there and runs.
        boxes = [lab.client.create_sandbox(one_cpu()) for _ in range(4)]
        there = [b for b in boxes if node_of(b.container_id) == node_of(old.container_id)]
        assert there, [b.container_id for b in boxes]
        for box in there:
            assert lab.client.exec(box.id, ["true"]).verdict == "ok"
        # The fresh agent reaped what the dead one made.
        assert old.container_id.partition("@")[0][:12] not in containers_labelled(
            lab.instance_id, name
        )
    finally:
        for box in [old, *boxes]:
            lab.client.destroy_sandbox(box.id)


def test_run_and_grade_commands_work_through_the_gateway(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = lab.service.address
    assert cli.main(["run", "--address", address, "--json", "--", "echo", "via-gateway"]) == 0
    out = capsys.readouterr().out
    assert "via-gateway" in out and json.loads(out.strip().splitlines()[-1])["verdict"] == "ok"
    write_files(tmp_path / "tests", {"test_add.py": ADD_TEST})
    write_files(tmp_path / "subs" / "good", {"calc.py": "def add(a, b):\n    return a + b\n"})
    write_files(tmp_path / "subs" / "bad", {"calc.py": "def add(a, b):\n    return a - b\n"})
    results = tmp_path / "results.json"
    code = cli.main([
        "grade", "--tests", str(tmp_path / "tests"), "--submissions", str(tmp_path / "subs"),
        "--runtime", "runc", "--out", str(results), "--address", address,
    ])  # fmt: skip
    assert code == 0
    verdicts = {s["name"]: s["verdict"] for s in json.loads(results.read_text())["submissions"]}
    assert verdicts == {"good": "passed", "bad": "failed"}


ADD_TEST = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def write_files(root: Path, files: dict[str, str]) -> None:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)


def test_a_lost_node_ends_its_sandboxes_clearly_and_spares_the_others(lab: Lab) -> None:
    boxes = [lab.client.create_sandbox(one_cpu(timeout_seconds=150.0)) for _ in range(4)]
    try:
        name = "n2"  # the head cannot go: the gateway's own Ray connection is through it
        doomed = [b for b in boxes if node_of(b.container_id) == lab.short_id(name)]
        spared = [b for b in boxes if node_of(b.container_id) != lab.short_id(name)]
        assert len(doomed) == len(spared) == 2
        errors: list[BaseException] = []
        started = threading.Event()

        def long_exec() -> None:
            started.set()
            try:
                lab.client.exec(doomed[0].id, ["sleep", "120"], timeout=150.0)
            except SandboxError as exc:
                errors.append(exc)

        runner = threading.Thread(target=long_exec)
        runner.start()
        started.wait()
        time.sleep(1.0)  # the exec is under way on the node
        lab.ray.kill_node(name)
        runner.join(timeout=120.0)
        assert not runner.is_alive(), "the exec on the lost node did not end"
        assert len(errors) == 1 and isinstance(errors[0], NodeLost), errors
        assert f"node {name} was lost" in str(errors[0])
        with pytest.raises(NodeLost, match=f"node {name} was lost"):
            lab.client.exec(doomed[-1].id, ["true"])
        for box in spared:
            assert lab.client.exec(box.id, ["true"]).verdict == "ok"
        # The node comes back under its name: its new agent reaps what the old one left.
        assert containers_labelled(lab.instance_id, name)
        lab.ray.add_node(name)
        new = [lab.client.create_sandbox(one_cpu()) for _ in range(2)]
        boxes.extend(new)
        assert len({node_of(b.container_id) for b in new}) >= 1
        left = set(containers_labelled(lab.instance_id, name))
        assert not left & {b.container_id.partition("@")[0][:12] for b in doomed}
    finally:
        for box in boxes:
            lab.client.destroy_sandbox(box.id)
