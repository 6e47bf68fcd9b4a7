"""The host's environment inside the sandbox: distributions, plugins, interpreter."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def outcomes(result: pytest.RunResult) -> dict[str, str]:
    """nodeid -> outcome from `-rA` summary lines."""
    pattern = r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)"
    found = re.findall(pattern, result.stdout.str(), re.M)
    return {nodeid: outcome for outcome, nodeid in found}


def test_installed_distributions_and_their_plugins_match_the_host(
    pytester: pytest.Pytester, no_leftovers: None
) -> None:
    import hypothesis

    # hypothesis is a pytest plugin (entry point pytest11) with an option and a marker;
    # under --strict-markers/--strict-config they exist inside only if the plugin loads.
    pytester.makeini(
        """
        [pytest]
        addopts = --strict-markers --strict-config --hypothesis-seed=0
        """
    )
    pytester.makepyfile(
        test_env=f"""
        import sys
        import pytest
        from hypothesis import given, strategies as st

        @given(st.integers())
        def test_property(x):
            assert x + 0 == x

        @pytest.mark.hypothesis
        def test_marker_is_known():
            pass

        def test_same_versions():
            import hypothesis, pluggy
            assert hypothesis.__version__ == {hypothesis.__version__!r}
            assert sys.version_info[:2] == {tuple(sys.version_info[:2])!r}

        def test_fails_the_same():
            assert 1 == 2
        """
    )
    local = pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider")
    routed = pytester.runpytest_subprocess("-rA", "--sandbox=all", "--sandbox-scope=module")
    assert outcomes(local) == outcomes(routed), routed.stdout.str()
    assert outcomes(routed)["test_env.py::test_fails_the_same"] == "FAILED"
    assert len(outcomes(routed)) == 4


def test_a_base_image_with_another_python_is_one_message_at_session_start(
    pytester: pytest.Pytester, no_leftovers: None
) -> None:
    # A real image whose python3 reports 3.9: the site hook runs in every interpreter.
    hook = "import sys; sys.version_info = (3, 9, 2, 'final', 0)"
    pytester.makeini(
        f"""
        [pytest]
        sandbox_dockerfile = RUN echo "{hook}" > /usr/lib/python3.11/sitecustomize.py
        """
    )
    pytester.makepyfile(
        test_a="def test_one():\n    pass\n\ndef test_two():\n    pass\n",
    )
    result = pytester.runpytest_subprocess("--sandbox=all")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    host = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert err.count("has Python 3.9, but this pytest runs on Python " + host) == 1, err
    assert f"python:{host}-slim" in err
    assert "not collected in the sandbox" not in result.stdout.str()


@pytest.fixture
def pip_cache(
    pytester: pytest.Pytester,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """A project naming requirements.txt in its ini, with a pip-install cache of its own."""
    pytester.makeini("[pytest]\nsandbox_requirements = requirements.txt\n")
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def test_a_requirements_file_defines_the_sandbox_environment(
    pytester: pytest.Pytester, no_leftovers: None, pip_cache: Path
) -> None:
    # pip on the host installs it (its index settings and certificates stay on the host);
    # the host's own distributions are then not mirrored.
    pytester.makefile(".txt", requirements="six==1.16.0\n")
    pytester.makepyfile(
        test_req="""
        import importlib.util

        def test_six_from_the_file():
            import six
            assert six.__version__ == "1.16.0"
            assert six.__file__.startswith("/opt/pytest-sandbox/site/")

        def test_host_only_distributions_are_not_there():
            assert importlib.util.find_spec("hypothesis") is None
        """
    )
    result = pytester.runpytest_subprocess("--sandbox=all", "-rA")
    result.assert_outcomes(passed=2)
    assert list((pip_cache / "pytest-sandbox" / "requirements").iterdir())


def test_a_requirements_file_pip_cannot_install_is_one_clear_message(
    pytester: pytest.Pytester, no_leftovers: None, pip_cache: Path
) -> None:
    pytester.makefile(".txt", requirements="--no-index\nsix==1.16.0\n")  # offline: no registry
    pytester.makepyfile(test_a="def test_one():\n    pass\n")
    result = pytester.runpytest_subprocess("--sandbox=all")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*sandbox_requirements = requirements.txt: pip could not install it*remove the key*"]
    )
