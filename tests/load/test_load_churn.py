"""Many clients at once: every call answers with success or a documented status, nothing leaks."""

from __future__ import annotations

import time
import uuid

import pytest
from sandboxd_process import SandboxdProcess, containers_of, docker_lines, wait_until
from workload import run_load, snapshot

from sandboxd.client import SandboxClient

CLIENTS = 16
ROUNDS = 2


def _settle(proc: SandboxdProcess) -> dict[str, int]:
    """Let finished calls' threads end before measuring."""
    time.sleep(1.0)
    return snapshot(proc)


@pytest.mark.slow
def test_sixteen_clients_churn_sandboxes_and_leave_nothing_behind(sandboxd) -> None:
    proc = sandboxd(
        {"caps": {"sandboxes": 64}, "reap_interval_seconds": 5.0, "pool_max_per_key": 4}
    )
    # One image built by every client at once: one build, the rest cache hits.
    fragment = f"ENV SANDBOX_LOADTEST={uuid.uuid4().hex}"
    with SandboxClient(proc.address) as client:
        built = client.build_image(fragment, label="load")
    image = built.image.key

    warm = run_load(proc.address, clients=CLIENTS, rounds=1, image=image)
    assert not warm.failures and not warm.wrong, (warm.failures, warm.wrong)
    before = _settle(proc)

    result = run_load(proc.address, clients=CLIENTS, rounds=ROUNDS, image=image)
    after = _settle(proc)
    report = (
        f"{result.sandboxes} sandboxes in {result.wall_seconds:.1f}s "
        f"({result.throughput():.2f}/s)\n{result.table()}\nbefore {before} after {after}"
    )
    print(report)

    assert result.undocumented() == [], report
    assert result.wrong == [], report
    assert result.sandboxes == CLIENTS * ROUNDS, report
    # With 64 slots for 16 clients nothing should even need to queue.
    assert result.failures == [], report

    # Destroy answers at once and removes the container in the background; what stays is
    # the warm pool for the one resolved request.
    pool_max = int(proc.settings.get("pool_max_per_key", 4))
    assert wait_until(lambda: len(containers_of(proc.instance_id)) <= pool_max, 30)
    with SandboxClient(proc.address) as client:
        assert client.list_sandboxes() == []
    # 16 clients built it at once: one image, one tag, no stray ones.
    tags = docker_lines(
        "images", "--format", "{{.Tag}}", "--filter", f"label=sandbox.image-key={image}"
    )
    assert tags == [built.image.tag.partition(":")[2]], tags
    assert proc.temp_files() == [], "the service left temp files"

    # Resource use returns to the warmed-up baseline: threads and fds exactly (small
    # slack for the health check's own connection), RSS within a band.
    assert wait_until(lambda: proc.threads() <= before["threads"] + 2, 10), (before, snapshot(proc))
    assert wait_until(lambda: proc.fds() <= before["fds"] + 4, 10), (before, snapshot(proc))
    assert after["rss"] <= before["rss"] * 1.25 + (24 << 20), report

    # A graceful stop removes the warm ones too.
    assert proc.terminate() == 0, proc.log()
    assert wait_until(lambda: containers_of(proc.instance_id) == [], 30), "containers left"
    docker_lines("rmi", "-f", built.image.tag)
