from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandboxd.config import (
    DEFAULT_PROFILE,
    UNTRUSTED_PROFILE,
    Profile,
    ServerConfig,
    load_config,
)
from sandboxd.errors import InvalidArgument
from sandboxd.limits import Caps, GiB, Limits, MiB


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOXD_INSTANCE_PREFIX", raising=False)
    cfg = load_config()
    assert cfg.base_image == "sandbox-base:bookworm"
    assert cfg.defaults == Limits()
    assert cfg.caps == Caps()
    assert len(cfg.instance_id) == 12


def test_each_config_gets_its_own_instance_id() -> None:
    assert ServerConfig().instance_id != ServerConfig().instance_id


def test_instance_ids_take_the_prefix_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SANDBOXD_INSTANCE_PREFIX", "tabc12")
    made = ServerConfig().instance_id
    assert made.startswith("tabc12") and len(made) == 6 + 12
    assert ServerConfig(instance_id="given").instance_id == "given"


def test_file_sets_defaults_caps_and_settings(tmp_path: Path) -> None:
    path = tmp_path / "sandboxd.toml"
    path.write_text(
        'base_image = "python:3.12-slim"\n'
        'instance_id = "abc123"\n'
        'state_dir = "/var/lib/sandboxd"\n'
        "reap_interval_seconds = 5.0\n"
        "[defaults]\n"
        'memory_bytes = "256m"\n'
        "pids = 64\n"
        "[caps]\n"
        'memory_bytes = "2g"\n'
        "sandboxes = 8\n"
    )
    cfg = load_config(path)
    assert cfg.base_image == "python:3.12-slim"
    assert cfg.instance_id == "abc123"
    assert cfg.state_dir == Path("/var/lib/sandboxd")
    assert cfg.reap_interval_seconds == 5.0
    assert cfg.defaults.memory_bytes == 256 * MiB
    assert cfg.defaults.pids == 64
    assert cfg.defaults.cpus == Limits().cpus
    assert cfg.caps.memory_bytes == 2 * GiB
    assert cfg.caps.sandboxes == 8


def test_overrides_win_over_the_file_and_none_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('docker_host = "unix:///a.sock"\n')
    assert load_config(path, docker_host="unix:///b.sock").docker_host == "unix:///b.sock"
    assert load_config(path, docker_host=None).docker_host == "unix:///a.sock"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("nonsense = 1\n", "unknown setting 'nonsense'"),
        ("[caps]\nmemory = 1\n", r"caps.memory: unknown setting"),
        ('[defaults]\nmemory_bytes = "lots"\n', "defaults.memory_bytes: expected a size"),
        ("this is not toml", "c.toml"),
    ],
)
def test_bad_files_are_refused_with_the_place(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=why):
        load_config(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"missing.toml"):
        load_config(tmp_path / "missing.toml")


def test_profiles() -> None:
    cfg = ServerConfig()
    assert cfg.profile("") is DEFAULT_PROFILE
    assert cfg.profile("untrusted") is UNTRUSTED_PROFILE
    assert UNTRUSTED_PROFILE.user != "0:0" and not UNTRUSTED_PROFILE.allow_network
    with pytest.raises(
        InvalidArgument, match=r"spec.profile: unknown profile 'x' \(known: default, untrusted\)"
    ):
        cfg.profile("x")


def test_file_profiles_become_profiles_next_to_the_built_in_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[[profiles]]\n"
        'name = "grader"\n'
        'user = "2000:2000"\n'
        'runtime = "runc"\n'
        'missing_runtime = "refuse"\n'
        "allow_network = false\n"
        "ulimits = { nofile = [128, 256], core = 0 }\n"
        "[[profiles]]\n"
        'name = "untrusted"\n'
        'runtime = "runsc"\n'
    )
    cfg = load_config(path)
    grader = cfg.profile("grader")
    assert grader == Profile(
        name="grader",
        runtime="runc",
        missing_runtime="refuse",
        user="2000:2000",
        ulimits=(("nofile", 128, 256), ("core", 0, 0)),
        allow_network=False,
    )
    assert cfg.profile("") is DEFAULT_PROFILE
    # One of a built-in's name replaces it, with the dataclass defaults for what it leaves out.
    assert cfg.profile("untrusted") == Profile(name="untrusted", runtime="runsc")
    assert [p.name for p in cfg.profiles] == ["default", "untrusted", "grader"]


def test_a_file_profile_can_be_the_default(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('default_profile = "mine"\n[[profiles]]\nname = "mine"\nuser = "3:3"\n')
    assert load_config(path).profile("").user == "3:3"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('[profiles]\nname = "x"\n', r"profiles: write each profile as a \[\[profiles\]\] table"),
        ('[[profiles]]\nuser = "1:1"\n', r"profiles\[0\].name: every profile needs a name"),
        ('[[profiles]]\nname = "x"\nnetwork = true\n', r"profiles\[0\].network: unknown profile"),
        ('[[profiles]]\nname = "x"\nallow_network = "no"\n', "profiles.x.allow_network: must be"),
        ('[[profiles]]\nname = "x"\nuser = 0\n', "profiles.x.user: must be a str"),
        ('[[profiles]]\nname = "x"\nmissing_runtime = "ask"\n', "must be 'refuse' or"),
        ('[[profiles]]\nname = "x"\nulimits = [1]\n', "profiles.x.ulimits: write it as a table"),
        ('[[profiles]]\nname = "x"\nulimits = { files = 1 }\n', r"ulimits.files: unknown"),
        ('[[profiles]]\nname = "x"\nulimits = { nofile = [2, 1] }\n', "soft limit is above"),
        ('[[profiles]]\nname = "x"\nulimits = { nofile = "1" }\n', "give a number or"),
        ('default_profile = "nope"\n', r"unknown profile 'nope' \(known: default, untrusted\)"),
    ],
)
def test_bad_profiles_are_refused_with_the_place(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=why):
        load_config(path)


def test_state_dir_defaults_to_one_of_this_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOXD_STATE_DIR", raising=False)
    assert ServerConfig().state_dir.name == f"sandboxd-{os.getuid()}"
    monkeypatch.setenv("SANDBOXD_STATE_DIR", "/srv/sandboxd")
    assert ServerConfig().state_dir == Path("/srv/sandboxd")
