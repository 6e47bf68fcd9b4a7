"""Coverage data measured under the sandbox's project path, combined on the host the way
pytest-cov combines parallel data files, gives the local run's figures on host paths."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import coverage

from pytest_sandbox.coverage_data import path_mapper, write_mapped

MODULE = """
def used(x):
    if x > 0:
        return "positive"
    return "other"


def unused():
    return 1
"""


def make_project(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "mod.py").write_text(MODULE)
    (root / "run.py").write_text("import pkg.mod\npkg.mod.used(1)\n")
    return root


def measure(root: Path, data_file: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "coverage", "run", f"--data-file={data_file}",
         f"--source={root / 'pkg'}", "run.py"],
        cwd=root, check=True, capture_output=True,
    )  # fmt: skip


def total(data_file: Path) -> tuple[float, list[str]]:
    cov = coverage.Coverage(data_file=str(data_file))
    cov.load()
    measured = sorted(cov.get_data().measured_files())
    return cov.report(file=io.StringIO()), measured


def test_sandbox_data_combined_on_the_host_matches_the_local_run(tmp_path: Path) -> None:
    host = make_project(tmp_path / "host")
    inside = make_project(tmp_path / "sandbox" / "project")
    measure(host, tmp_path / "local.cov")
    measure(inside, tmp_path / "inside.cov")

    data_file = host / ".coverage"
    written = write_mapped(
        (tmp_path / "inside.cov").read_bytes(), str(inside), host, data_file, "box1"
    )
    assert written.parent == host and written.name.startswith(".coverage.sandbox.box1")
    # What pytest-cov's controller does at the end of the test loop.
    combining = coverage.Coverage(data_file=str(data_file))
    combining.combine()
    combining.save()

    local_total, local_files = total(tmp_path / "local.cov")
    routed_total, routed_files = total(data_file)
    assert routed_total == local_total
    assert 0 < routed_total < 100
    assert (
        routed_files
        == local_files
        == [str(host / "pkg" / "__init__.py"), str(host / "pkg" / "mod.py")]
    )


def test_paths_outside_the_project_are_left_alone(tmp_path: Path) -> None:
    mapper = path_mapper("/project", tmp_path)
    assert mapper("/project/pkg/mod.py") == str(tmp_path / "pkg" / "mod.py")
    assert mapper("/projectile/x.py") == "/projectile/x.py"
    assert mapper("/opt/lib/six.py") == "/opt/lib/six.py"
