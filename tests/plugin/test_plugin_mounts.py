"""The `mounts=` marker argument: a routed test sees the host directories the server allows."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandboxd.config import ServerConfig
from sandboxd.server import Service, create_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def host_dirs() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="sbx-marker-", dir="/tmp"))
    top.chmod(0o755)
    for name in ("data", "out"):
        (top / name).mkdir(mode=0o777)
        (top / name).chmod(0o777)
    (top / "data" / "table.csv").write_text("a,b\n1,2\n")
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def mounting_service(
    host_dirs: Path, config_factory: Callable[..., ServerConfig], short_tmp: Path
) -> Iterator[Service]:
    config = config_factory(
        mount_roots=(host_dirs / "data",), writable_mount_roots=(host_dirs / "out",)
    )
    service, _ = create_server(config, f"unix:{short_tmp}/marker-mounts.sock")
    try:
        yield service
    finally:
        service.stop(grace=1.0)


def test_marker_mounts_reach_the_routed_test(
    pytester: pytest.Pytester, mounting_service: Service, host_dirs: Path, no_leftovers: None
) -> None:
    data, out = host_dirs / "data", host_dirs / "out"
    pytester.makepyfile(
        test_mounted=f"""
import pytest

@pytest.mark.sandbox(mounts=["{data}:/data"])
def test_reads_the_dataset_read_only():
    assert open("/data/table.csv").read() == "a,b\\n1,2\\n"
    with pytest.raises(OSError, match="Read-only file system"):
        open("/data/new.csv", "w")

@pytest.mark.sandbox(mounts=["{out}:/sandbox/work/out:rw"])
def test_writes_below_a_writable_root():
    with open("/sandbox/work/out/result.txt", "w") as f:
        f.write("written inside")

@pytest.mark.sandbox(mounts=["/etc:/host-etc"])
def test_outside_the_allowlist():
    pass
"""
    )
    result = pytester.runpytest_subprocess(
        "--sandbox", f"--sandbox-address={mounting_service.address}", "-rA"
    )
    result.stdout.fnmatch_lines_random(
        [
            "PASSED test_mounted.py::test_reads_the_dataset_read_only",
            "PASSED test_mounted.py::test_writes_below_a_writable_root",
            "could not create a sandbox: spec.mounts*: /etc is not below a directory this "
            "server allows mounting",
        ]
    )
    result.assert_outcomes(passed=2, errors=1)
    assert (out / "result.txt").read_text() == "written inside"
