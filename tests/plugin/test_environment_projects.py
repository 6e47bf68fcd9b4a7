"""Real projects with dependencies: the same per-test outcomes locally and routed.

Each test makes a throwaway virtualenv with the project's dependencies (installs
come from the pip cache after the first run), runs the project's tests once
locally and once under `--sandbox=all`, and compares the outcome of every test.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

import pytest_sandbox

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CHECKOUT = Path(pytest_sandbox.__file__).resolve().parent.parent
# What the plugin itself needs on the host: the project's declared dependencies, at the
# versions installed here (cache hits), read from pyproject.toml so a new one is not missed.
_DECLARED = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]["dependencies"]
PLUGIN_DEPS = [
    f"{name}=={metadata.version(name)}"
    for name in (re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0] for spec in _DECLARED)
]
QUIET = ("-p", "no:cacheprovider", "-rA", "-q", "--color=no")
# A parametrized id may hold spaces: the key is its first word (the same in both runs),
# the line's reason follows " - ".
OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)(.*)$", re.M)


def make_venv(where: Path, packages: list[str]) -> Path:
    """A virtualenv holding `packages` and the plugin's dependencies; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    pip(python, "install", *PLUGIN_DEPS, *packages)
    return python


def pip(python: Path, *args: str) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "-q", "--disable-pip-version-check", *args],
        check=True,
        capture_output=True,
    )


class Outcomes(dict[str, str]):
    """nodeid -> outcome (the -rA summary) of one pytest run; `reasons` holds each
    line's message, so a difference between two runs says why."""

    reasons: dict[str, str]


def differences(local: Outcomes, routed: Outcomes) -> dict[str, tuple[str, ...]]:
    return {
        nodeid: (outcome, routed.get(nodeid, "missing"), routed.reasons.get(nodeid, ""))
        for nodeid, outcome in local.items()
        if routed.get(nodeid) != outcome
    }


def run_pytest(python: Path, project: Path, *args: str) -> Outcomes:
    """The outcome of each test of one pytest run of `project`."""
    # The plugin from this checkout, through a directory holding only its packages: the
    # checkout's own root may hold the editable install's metadata, whose pytest11 entry
    # point would register the plugin a second time next to `-p`.
    packages = project.parent / "plugin-packages"
    if not packages.exists():
        packages.mkdir()
        for name in ("pytest_sandbox", "sandboxd"):
            (packages / name).symlink_to(CHECKOUT / name)
    env = dict(os.environ, PYTHONPATH=str(packages), COLUMNS="300")  # whole -rA reasons
    result = subprocess.run(
        [str(python), "-m", "pytest", "-p", "pytest_sandbox.plugin", *QUIET, *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    found = OUTCOME.findall(result.stdout)
    assert found, result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = Outcomes((nodeid, outcome) for outcome, nodeid, _ in found)
    outcomes.reasons = {nodeid: rest.partition(" - ")[2] for _, nodeid, rest in found}
    return outcomes


def summary(outcomes: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def test_python_dateutil_from_its_sdist_with_its_dev_requirements(
    tmp_path: Path, no_leftovers: None
) -> None:
    python = make_venv(tmp_path / "venv", ["six", "freezegun", "hypothesis", "pytest-cov"])
    pip(
        python,
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "-d",
        str(tmp_path),
        "python-dateutil==2.9.0",
    )
    with tarfile.open(tmp_path / "python-dateutil-2.9.0.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    project = tmp_path / "python-dateutil-2.9.0"
    pip(python, "install", "--no-deps", "-e", str(project))  # editable: paths into the rootdir

    # Both runs: pytest 9 turns one module's parametrize-with-a-generator into a
    # collection error (filterwarnings = error); the rest still runs. The sandbox's
    # project tree is read-only, so hypothesis' example database falls back to memory
    # with a warning, which the same filter would turn into 5 failures routed only.
    args = ["--continue-on-collection-errors", "-W", "ignore::hypothesis.errors.HypothesisWarning"]
    local = run_pytest(python, project, *args)
    routed = run_pytest(python, project, *args, "--sandbox=all", "--sandbox-scope=module")
    assert summary(local).get("PASSED", 0) > 1400, summary(local)
    assert routed == local, differences(local, routed)


def test_compiled_dependency_and_an_ini_configured_plugin_under_strict_config(
    tmp_path: Path, no_leftovers: None
) -> None:
    python = make_venv(tmp_path / "venv", ["numpy", "pytest-timeout"])
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pytest.ini").write_text(
        "[pytest]\naddopts = --strict-config --strict-markers\ntimeout = 30\n"
    )
    (project / "test_numeric.py").write_text(
        "import numpy as np\n"
        "import pytest\n\n"
        "def test_linalg():\n"
        "    a = np.array([[2.0, 0.0], [0.0, 4.0]])\n"
        "    assert np.allclose(np.linalg.inv(a) @ a, np.eye(2))\n\n"
        "@pytest.mark.timeout(5)\n"
        "def test_timeout_marker_is_known():\n"
        "    assert np.__version__\n\n"
        "def test_fails():\n"
        "    assert np.sum(np.arange(4)) == 7\n"
    )
    local = run_pytest(python, project)
    routed = run_pytest(python, project, "--sandbox=all")
    assert routed == local, differences(local, routed)
    assert summary(routed) == {"PASSED": 2, "FAILED": 1}
