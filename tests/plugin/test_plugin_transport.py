"""A project past 100 MB routes its tests, and a rerun sends only what changed.

The service is a standing one (the session's), as a developer's would be: its blob
store outlives each pytest run, which is what makes a rerun cheap.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

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


def write_part(pytester: pytest.Pytester, index: int) -> int:
    data = os.urandom(PART_BYTES)
    pytester.path.joinpath("data", f"part{index}.bin").write_bytes(data)
    return len(data)


def write_sums(pytester: pytest.Pytester) -> None:
    parts = sorted(pytester.path.joinpath("data").iterdir())
    sums = [hashlib.sha256(p.read_bytes()).hexdigest() for p in parts]
    pytester.path.joinpath("sums.txt").write_text("\n".join(sums) + "\n")


def test_a_project_over_100_mb_routes_and_a_rerun_sends_only_the_changed_file(
    pytester: pytest.Pytester, service: Service, new_images: None, no_leftovers: None
) -> None:
    blobs = service.core.images.blobs
    assert blobs is not None
    pytester.path.joinpath("data").mkdir()
    for i in range(PARTS):
        write_part(pytester, i)
    write_sums(pytester)
    pytester.makepyfile(test_data=TEST_FILE)
    args = ("--sandbox=all", f"--sandbox-address={service.address}", "-p", "no:cacheprovider")

    before = blobs.received_bytes
    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=1)
    sent_first = blobs.received_bytes - before
    assert sent_first >= PARTS * PART_BYTES  # the data travelled, as blobs

    before = blobs.received_bytes
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert blobs.received_bytes == before  # nothing changed: a cache hit, no upload

    changed = write_part(pytester, 2)
    write_sums(pytester)
    sums_size = pytester.path.joinpath("sums.txt").stat().st_size
    before = blobs.received_bytes
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert blobs.received_bytes - before == changed + sums_size
