"""`make_engine` picks the adapter the config names; nothing is contacted on the way."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.config import ServerConfig, load_config
from sandboxd.engine import ENGINES, LOCAL_ENGINES, make_engine
from sandboxd.engine.docker import DockerEngine
from sandboxd.engine.podman import DEFAULT_PODMAN_SOCKET, PodmanEngine
from sandboxd.errors import InvalidArgument


def test_every_listed_engine_can_be_made() -> None:
    assert set(ENGINES) == {"docker", "podman", "cluster"}
    assert set(LOCAL_ENGINES) == set(ENGINES) - {"cluster"}
    for name in ENGINES:
        make_engine(ServerConfig(engine=name))


def test_podman_from_the_config_file_with_its_default_socket(tmp_path: Path) -> None:
    path = tmp_path / "sandboxd.toml"
    path.write_text('engine = "podman"\n')
    engine = make_engine(load_config(path))
    assert isinstance(engine, PodmanEngine)
    assert engine.base_url == DEFAULT_PODMAN_SOCKET


def test_podman_host_and_docker_host_are_separate_settings() -> None:
    config = ServerConfig(engine="podman", podman_host="unix:///x/p.sock", docker_host="unix:///d")
    podman = make_engine(config)
    assert isinstance(podman, PodmanEngine) and podman.base_url == "unix:///x/p.sock"
    docker = make_engine(ServerConfig(engine="docker", docker_host="unix:///d"))
    assert type(docker) is DockerEngine and docker.base_url == "unix:///d"


def test_an_unknown_engine_is_named_in_the_error() -> None:
    known = r"\(known: docker, podman, cluster\)"
    with pytest.raises(InvalidArgument, match=rf"unknown engine 'rkt' {known}"):
        make_engine(ServerConfig(engine="rkt"))


def test_the_cli_engine_option_overrides_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandboxd import cli

    path = tmp_path / "sandboxd.toml"
    path.write_text('engine = "docker"\n')
    seen: list[str] = []
    monkeypatch.setitem(cli.COMMANDS, "gc", lambda args, config: seen.append(config.engine) or 0)
    assert cli.main(["--config", str(path), "--engine", "podman", "gc"]) == 0
    assert cli.main(["--config", str(path), "gc"]) == 0
    assert seen == ["podman", "docker"]


def test_the_cluster_engine_is_made_without_contacting_the_cluster() -> None:
    from sandboxd.engine.cluster import ClusterEngine

    config = ServerConfig(engine="cluster", cluster_address="10.0.0.1:6379")
    engine = make_engine(config)
    assert isinstance(engine, ClusterEngine)
    assert engine.address == "10.0.0.1:6379"
    assert engine.placement_timeout == config.admission_timeout_seconds


def test_ray_is_imported_only_when_a_cluster_is_configured() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sandboxd.server, sandboxd.cli, pytest_sandbox.plugin\n"
        "from sandboxd.config import ServerConfig\n"
        "from sandboxd.engine import make_engine\n"
        "make_engine(ServerConfig())\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
