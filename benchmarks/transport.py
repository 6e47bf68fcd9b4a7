"""Bytes a `pytest --sandbox` run sends for its build context, first run and reruns.

    .venv/bin/python benchmarks/transport.py [--mb 110] [--parts 4]

Makes a project with a data directory of incompressible bytes, starts one sandboxd
(its blob store lives as long as it does, as a developer's standing service would),
and runs the project's test through `pytest --sandbox=all` three times: first run, a
rerun with no change, and a rerun after rewriting one data file. For each run it
prints the bytes the service received as blobs and their ratio to the full context,
which is what the first run against an empty store sends. Removes the images it built,
the project and the service's state when done.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandboxd.client import SandboxClient  # noqa: E402
from sandboxd.server import Embedded, start_embedded  # noqa: E402

MiB = 1024 * 1024
TEST_FILE = """
import hashlib, pathlib

def test_data_arrived():
    here = pathlib.Path(__file__).parent
    parts = sorted(here.joinpath("data").iterdir())
    expected = here.joinpath("sums.txt").read_text().split()
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in parts] == expected
"""


def write_part(project: Path, index: int, size: int) -> None:
    project.joinpath("data", f"part{index}.bin").write_bytes(os.urandom(size))


def write_sums(project: Path) -> None:
    parts = sorted(project.joinpath("data").iterdir())
    sums = [hashlib.sha256(p.read_bytes()).hexdigest() for p in parts]
    project.joinpath("sums.txt").write_text("\n".join(sums) + "\n")


def tree_bytes(project: Path) -> int:
    return sum(p.stat().st_size for p in project.rglob("*") if p.is_file())


def run_pytest(project: Path, address: str) -> float:
    """One routed run; its wall seconds. Exits when the test does not pass."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox=all",
         f"--sandbox-address={address}"],
        cwd=project, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"pytest failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def measure(embedded: Embedded, project: Path, args: argparse.Namespace) -> None:
    blobs = embedded.service.core.images.blobs
    assert blobs is not None
    part = args.mb * MiB // args.parts
    project.joinpath("data").mkdir()
    for i in range(args.parts):
        write_part(project, i, part)
    write_sums(project)
    project.joinpath("test_data.py").write_text(TEST_FILE)
    print(f"project tree: {tree_bytes(project) / MiB:.1f} MiB ({args.parts} data files)")
    rows: list[tuple[str, int, float]] = []
    for label in ("first run", "no-change rerun", "one-file-changed rerun"):
        if label.startswith("one-file"):
            write_part(project, args.parts // 2, part)
            write_sums(project)
        before = blobs.received_bytes
        seconds = run_pytest(project, embedded.address)
        rows.append((label, blobs.received_bytes - before, seconds))
    full = rows[0][1]
    print(f"full context (first run, empty store): {full} bytes")
    print(f"{'run':<24}{'bytes sent':>14}{'ratio':>10}{'wall s':>9}")
    for label, sent, seconds in rows:
        print(f"{label:<24}{sent:>14}{sent / full:>10.5f}{seconds:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=110, help="data directory size in MiB")
    parser.add_argument("--parts", type=int, default=4, help="files in the data directory")
    args = parser.parse_args()
    embedded = start_embedded()
    project = Path(tempfile.mkdtemp(prefix="sbx-transport-"))
    client = SandboxClient(embedded.address)
    before = {i.key for i in client.list_images()}
    try:
        measure(embedded, project, args)
    finally:
        for image in client.list_images():
            if image.key not in before:
                client.delete_image(image.key)
        client.close()
        embedded.stop()
        shutil.rmtree(project, ignore_errors=True)


if __name__ == "__main__":
    main()
