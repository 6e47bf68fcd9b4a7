"""What a person sees of pytest --sandbox: the header, build progress and failures,
warnings of routed tests, and a snapshot that ignores what git ignores."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pytest_sandbox import environment
from pytest_sandbox.progress import describe, plain
from pytest_sandbox.reuse import BuiltEnvironments, reuse_key
from pytest_sandbox.snapshot import project_files


def test_header_says_where_tests_run_and_the_isolation(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    embedded = pytester.runpytest_subprocess("--sandbox", "--co", "-p", "no:cacheprovider")
    embedded.stdout.fnmatch_lines(
        [
            "sandbox: tests marked sandbox via a sandboxd embedded in this session, "
            "up to * at once; scope test, isolation fork"
        ]
    )
    remote = pytester.runpytest_subprocess(
        "--sandbox=all",
        "--sandbox-isolation=container",
        "--sandbox-address=unix:/nonexistent/sandboxd.sock",
        "--co",
        "-p",
        "no:cacheprovider",
    )
    remote.stdout.fnmatch_lines(
        [
            "sandbox: every test via sandboxd at unix:/nonexistent/sandboxd.sock, "
            "up to * at once; scope test, isolation container"
        ]
    )


def test_header_names_the_local_daemon(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SANDBOXD_EMBEDDED")
    monkeypatch.setenv("SANDBOXD_SOCKET", str(tmp_path / "never-started.sock"))
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    # --co starts no service, and the header is written all the same.
    result = pytester.runpytest_subprocess("--sandbox", "--co")
    result.stdout.fnmatch_lines(
        [f"sandbox: tests marked sandbox via the local sandboxd daemon (unix:{tmp_path}/*"]
    )


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_snapshot_follows_gitignore(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text("def test_a():\n    pass\n")
    (tmp_path / ".gitignore").write_text("*.log\nreports/\n")
    _git(tmp_path, "init", "-q")
    before = project_files(tmp_path)
    (tmp_path / "run.log").write_text("stray\n")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "junit.xml").write_text("<testsuite/>\n")
    assert project_files(tmp_path) == before
    (tmp_path / "helper.py").write_text("X = 1\n")  # untracked, not ignored: part of it
    assert "project/helper.py" in project_files(tmp_path)


def test_snapshot_outside_git_takes_every_file(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text("def test_a():\n    pass\n")
    (tmp_path / "run.log").write_text("stray\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"")
    assert sorted(project_files(tmp_path)) == ["project/run.log", "project/test_a.py"]


def test_plain_removes_terminal_escapes() -> None:
    coloured = "\x1b[91mboom\x1b[0m\r\n\x1b]0;title\x07done \x1b[2K\x1b[1Gok"
    assert plain(coloured) == "boom\ndone ok"
    assert describe(("", "RUN a\nRUN b\n")) == "the service's base image + RUN a (+1 lines)"


FAILING_FRAGMENT = "RUN printf '\\\\033[91mbroken build\\\\033[0m\\\\n'; exit 3"


@pytest.mark.docker
@pytest.mark.slow
def test_failed_build_reported_once_and_build_progress_shown(
    pytester: pytest.Pytester, no_leftovers: None
) -> None:
    pytester.makepyfile(
        test_broken=f"""
            import pytest

            pytestmark = pytest.mark.sandbox(dockerfile="{FAILING_FRAGMENT}")

            def test_one():
                pass

            def test_two():
                pass

            def test_three():
                pass
        """
    )
    result = pytester.runpytest_subprocess("--sandbox", "-p", "no:cacheprovider", "-rA")
    out = result.stdout.str()
    assert "\x1b" not in out, "terminal escapes in the output"
    # the live line: image and step of the build under way
    result.stdout.fnmatch_lines(["building sandbox image */* for *: step */* RUN printf*"])
    assert out.count("--- build log tail ---") == 1, out
    assert out.count("returned a non-zero code: 3") == 1, out
    result.stdout.fnmatch_lines(
        [
            "*= sandbox image build failed =*",
            "*- the service's base image + RUN printf*",
            "*returned a non-zero code: 3*",
            "broken build",
        ]
    )
    result.stdout.fnmatch_lines(
        ["ERROR test_broken.py::test_one - sandbox image build failed for the service's*"]
    )
    result.assert_outcomes(errors=3)


@pytest.mark.docker
@pytest.mark.slow
def test_routed_warnings_reach_the_warnings_summary(
    pytester: pytest.Pytester, no_leftovers: None
) -> None:
    pytester.makepyfile(
        test_warns="""
            import warnings
            import pytest

            @pytest.mark.sandbox
            def test_warns():
                warnings.warn(DeprecationWarning("old api, said inside"))

            @pytest.mark.sandbox
            def test_quiet():
                pass
        """
    )
    result = pytester.runpytest_subprocess("--sandbox", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*= warnings summary =*",
            "test_warns.py::test_warns",
            f"  {pytester.path}/test_warns.py:6: DeprecationWarning: old api, said inside",
        ]
    )
    result.assert_outcomes(passed=2, warnings=1)


def test_environment_fingerprint_follows_file_metadata(tmp_path: Path) -> None:
    site = tmp_path / "site"
    info = site / "demo-1.0.dist-info"
    info.mkdir(parents=True)
    (site / "demo.py").write_text("X = 1\n")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
    (info / "RECORD").write_text("demo.py,,\ndemo-1.0.dist-info/METADATA,,\n")
    first = environment.fingerprint(tmp_path, [site])
    assert environment.fingerprint(tmp_path, [site]) == first
    (site / "demo.py").write_text("X = 22\n")  # another size: another environment
    second = environment.fingerprint(tmp_path, [site])
    assert second != first
    edited = (site / "demo.py").stat()
    (site / "demo.py").write_text("X = 33\n")  # edited in place, same size
    os.utime(site / "demo.py", ns=(edited.st_atime_ns, edited.st_mtime_ns + 10**9))
    assert environment.fingerprint(tmp_path, [site]) not in (first, second)
    (site / "demo-1.0.dist-info" / "RECORD").write_text("demo-1.0.dist-info/METADATA,,\n")
    assert environment.fingerprint(tmp_path, [site]) not in (first, second)  # a file less


def test_built_environments_remember_the_last_tag(tmp_path: Path) -> None:
    built = BuiltEnvironments(tmp_path / "cache" / "environments.json")
    key = reuse_key("fingerprint", "", "RUN true")
    assert built.get(key) is None
    built.put(key, "sandbox/img:one")
    built.put(key, "sandbox/img:two")
    assert BuiltEnvironments(built.path).get(key) == "sandbox/img:two"
    built.path.write_text("not json")
    assert built.get(key) is None
