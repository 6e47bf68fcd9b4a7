"""A project past 100 MB routes its tests, and a rerun sends only what changed.

The service is a standing one (the session's), as a developer's would be: its blob
store outlives each pytest run, which is what makes a rerun cheap.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.client import SandboxClient
from sandboxd.server import Service

pytestmark = [pytest.mark.docker, pytest.mark.slow]

MiB = 1024 * 1024
PARTS = 4
PART_BYTES = 28 * MiB  # 112 MiB of incompressible data in all

TEST_FILE = f"""
import hashlib, pathlib

def test_data_arrived():
    parts = sorted(pathlib.Path(__file__).parent.joinpath("data").iterdir())
    assert len(parts) == {PARTS}
    assert all(p.stat().st_size == {PART_BYTES} for p in parts)
    expected = pathlib.Path(__file__).parent.joinpath("sums.txt").read_text().split()
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in parts] == expected
"""


@pytest.fixture
def new_images(client: SandboxClient) -> Iterator[None]:
    """Deletes the images built while the test ran."""
    before = {i.key for i in client.list_images()}
    yield
    for image in client.list_images():
        if image.key not in before:
            client.delete_image(image.key)


def write_part(project: Path, index: int) -> int:
    data = os.urandom(PART_BYTES)
    project.joinpath("data", f"part{index}.bin").write_bytes(data)
    return len(data)


def write_sums(project: Path) -> None:
    parts = sorted(project.joinpath("data").iterdir())
    sums = [hashlib.sha256(p.read_bytes()).hexdigest() for p in parts]
    project.joinpath("sums.txt").write_text("\n".join(sums) + "\n")


def test_a_project_over_100_mb_routes_and_a_rerun_sends_only_the_changed_file(
    pytester: pytest.Pytester, service: Service, new_images: None, no_leftovers: None
) -> None:
    blobs = service.core.images.blobs
    assert blobs is not None
    # The project is a directory of its own: pytester writes each run's stdout and stderr
    # beside it, and those files are not the project's (they differ from run to run).
    project = pytester.mkdir("proj")
    project.joinpath("data").mkdir()
    for i in range(PARTS):
        write_part(project, i)
    write_sums(project)
    project.joinpath("test_data.py").write_text(TEST_FILE)
    args = (
        *("--sandbox=all", f"--sandbox-address={service.address}", "-p", "no:cacheprovider"),
        *("--rootdir", "proj", "proj"),
    )

    before = blobs.received_bytes
    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=1)
    sent_first = blobs.received_bytes - before
    assert sent_first >= PARTS * PART_BYTES  # the data travelled, as blobs

    before = blobs.received_bytes
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert blobs.received_bytes == before  # nothing changed: a cache hit, no upload

    changed = write_part(project, 2)
    write_sums(project)
    sums_size = project.joinpath("sums.txt").stat().st_size
    before = blobs.received_bytes
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert blobs.received_bytes - before == changed + sums_size
