"""`sandboxd --config FILE.toml`: profiles defined in the file reach real sandboxes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from sandboxd_cli import SANDBOXD


def _config(tmp_path: Path, instance_id: str, profile: str) -> Path:
    path = tmp_path / f"sandboxd-{instance_id}.toml"
    # The caps allow network, so that only the profile can refuse it.
    path.write_text(
        f'instance_id = "{instance_id}"\n\n[caps]\nnetwork = true\n\n[[profiles]]\n{profile}'
    )
    return path


def _sandboxd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SANDBOXD, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_profile_from_the_file_is_used_by_a_real_sandbox(
    tmp_path: Path, base_image: str, instance_id_factory: Callable[[], str]
) -> None:
    config = _config(
        tmp_path,
        instance_id_factory(),
        'name = "probe"\nuser = "4242:4242"\nallow_network = false\n'
        "ulimits = { nofile = [100, 100], core = 0 }\n",
    )
    probe = "id -u; id -g; ulimit -n; ulimit -c"
    r = _sandboxd(config, "run", "--profile", "probe", "--json", "--", "sh", "-c", probe)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:4] == ["4242", "4242", "100", "0"]
    # The profile's rule holds too: it allows no network, so asking for it is refused.
    r = _sandboxd(config, "run", "--profile", "probe", "--network", "--", "true")
    assert r.returncode != 0
    assert "profile 'probe' does not allow network access" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("profile", "why"),
    [
        ('name = "probe"\nnetwork = false\n', "profiles[0].network: unknown profile setting"),
        ('name = "probe"\nuser = 4242\n', "profiles.probe.user: must be a str"),
    ],
)
def test_a_bad_profile_in_the_file_is_refused_before_anything_runs(
    tmp_path: Path, instance_id_factory: Callable[[], str], profile: str, why: str
) -> None:
    config = _config(tmp_path, instance_id_factory(), profile)
    r = _sandboxd(config, "run", "--profile", "probe", "--", "true")
    assert r.returncode == 2, r.stderr
    assert f"sandboxd: error: {why}" in r.stderr
    assert "Traceback" not in r.stderr
