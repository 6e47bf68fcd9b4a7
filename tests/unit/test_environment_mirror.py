"""What of the host's environment is mirrored, how paths are rewritten, how it is layered."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from pytest_sandbox import environment, snapshot
from pytest_sandbox.environment import PROJECT, EnvironmentProblem


def install(
    site: Path, name: str, files: dict[str, str], extra: dict[str, str] | None = None
) -> None:
    """A minimal installed distribution: METADATA, RECORD and its files."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    for rel, text in {**files, **(extra or {})}.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    owned = [*files, *(extra or {}), f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in owned))


def test_editable_install_under_the_rootdir_points_into_the_snapshot(tmp_path: Path) -> None:
    root, site = tmp_path / "proj", tmp_path / "site"
    (root / "src" / "mypkg").mkdir(parents=True)
    install(
        site,
        "mypkg",
        {
            "__editable__.mypkg-1.0.pth": "import __editable___mypkg_finder as f; f.install()\n",
            "__editable___mypkg_finder.py": f"MAPPING = {{'mypkg': '{root}/src/mypkg'}}\n",
            "mypkg-1.0.dist-info/direct_url.json": f'{{"url": "file://{root}"}}',
        },
    )
    files = environment.distributions(root, [site])["mypkg"]
    assert (
        files["__editable___mypkg_finder.py"][0].decode()
        == f"MAPPING = {{'mypkg': '{PROJECT}/src/mypkg'}}\n"
    )
    assert f"file://{PROJECT}" in files["mypkg-1.0.dist-info/direct_url.json"][0].decode()


def test_editable_install_outside_the_rootdir_is_refused_by_name(tmp_path: Path) -> None:
    elsewhere, site = tmp_path / "elsewhere", tmp_path / "site"
    elsewhere.mkdir()
    install(site, "otherpkg", {"__editable__.otherpkg-1.0.pth": f"{elsewhere}\n"})
    with pytest.raises(EnvironmentProblem, match=r"otherpkg 1.0 is installed from .*--no-editable"):
        environment.distributions(tmp_path / "proj", [site])


def test_the_host_only_sandbox_plugin_is_left_out_and_pth_files_come_along(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install(
        site,
        "sandbox",
        {"pytest_sandbox/plugin.py": ""},
        {"sandbox-1.0.dist-info/entry_points.txt": "[pytest11]\nsandbox = pytest_sandbox.plugin\n"},
    )
    install(
        site,
        "plugged",
        {"plugged.py": "", "plugged-1.0.dist-info/entry_points.txt": "[pytest11]\np = plugged\n"},
    )
    (site / "hand-made.pth").write_text("import os\n")
    dists = environment.distributions(tmp_path / "proj", [site])
    assert "sandbox" not in dists and "plugged.py" in dists["plugged"]
    assert any("hand-made.pth" in files for files in dists.values())


def test_a_compiled_wheel_for_another_interpreter_is_refused_by_name(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install(
        site,
        "oldnative",
        {
            "oldnative.cpython-27mu.so": "x",
            "oldnative-1.0.dist-info/WHEEL": "Tag: cp27-cp27mu-manylinux1_x86_64\n",
        },
    )
    with pytest.raises(EnvironmentProblem, match=r"oldnative 1.0 was built for cp27-cp27mu"):
        environment.distributions(tmp_path / "proj", [site])


def test_one_changed_small_distribution_changes_one_layer() -> None:
    dists = {f"d{i}": {f"d{i}.py": (b"x" * 100, 0o644)} for i in range(20)}
    dists["big"] = {"big/core.so": (b"y" * environment.OWN_LAYER_BYTES, 0o644)}
    before = environment.layers(dists)
    dists["d7"] = {"d7.py": (b"changed", 0o644)}
    after = environment.layers(dists)
    assert before[0].name == "big.0" and before[0].top_level() == ["big"]
    assert len(before) == len(after)
    assert sum(a.files != b.files for a, b in zip(before, after, strict=True)) == 1


def test_imports_from_outside_site_dirs_and_rootdir_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stray = types.ModuleType("strayish")
    stray.__file__ = str(tmp_path / "elsewhere" / "strayish.py")
    monkeypatch.setitem(sys.modules, "strayish", stray)
    assert ("strayish", stray.__file__) in environment.outside_imports(tmp_path / "proj")
    assert all(name != "strayish" for name, _ in environment.outside_imports(tmp_path))


def test_a_python_mismatch_reads_as_one_sentence_with_both_versions_and_the_fix() -> None:
    log = "Step 3/9 : RUN ...\n\x1b[91mpytest-sandbox: python-mismatch image=3.9 host=3.11\n"
    message = snapshot.interpreter_problem(log, "debian:bookworm")
    assert message is not None
    assert "debian:bookworm has Python 3.9, but this pytest runs on Python 3.11" in message
    assert "python:3.11-slim" in message
    assert snapshot.interpreter_problem("some other build failure", "x") is None
