"""A fragment that installs a Debian package builds under the `proxy` network policy
(through the caching package proxy that scripts/host-setup.sh starts) and under the
single-user default (`open`).

The package comes from an apt repository the test makes (a .deb built with dpkg-deb,
its Packages and Release files) and serves from a container on a network the test
makes: no packet goes to a real mirror. Under `proxy` only the proxy is joined to that
network, so the build can fetch the package only through it.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from sandboxd.client import SandboxClient
from sandboxd.config import DEFAULT_PROFILE, UNTRUSTED_PROFILE, ServerConfig
from sandboxd.server import Service

PROXY = "sandbox-aptproxy"
BUILD_NETWORK = "sandbox-build"


def docker(*args: str, check: bool = True) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, f"docker {' '.join(args)}: {out.stderr.strip()}"
    return out.stdout.strip()


@dataclass(frozen=True)
class Repo:
    package: str
    #: Where builds (or the proxy) find the repository: name or address, on `network`.
    host: str
    container: str
    network: str

    def requesters(self) -> set[str]:
        """Addresses the repository's server was asked from (but its own readiness probe)."""
        logs = subprocess.run(
            ["docker", "logs", self.container], capture_output=True, text=True, timeout=60
        )
        asked = {line.split()[0] for line in logs.stderr.splitlines() if '"GET ' in line}
        return asked - {"127.0.0.1"}


def make_repository(root: Path, package: str) -> None:
    """A flat apt repository under root/flat with one architecture-independent package."""
    tree = root / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/bin").mkdir(parents=True)
    control = (
        f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: sandbox tests <tests@localhost>\nDescription: prints a greeting\n"
    )
    (tree / "DEBIAN/control").write_text(control)
    script = tree / "usr/bin" / package
    script.write_text(f"#!/bin/sh\necho hello from {package}\n")
    script.chmod(0o755)
    flat = root / "flat"
    flat.mkdir()
    deb = flat / f"{package}_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    data = deb.read_bytes()
    packages = (
        f"{control.rstrip()}\nFilename: flat/{deb.name}\nSize: {len(data)}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n\n"
    ).encode()
    (flat / "Packages").write_bytes(packages)
    digest = hashlib.sha256(packages).hexdigest()
    (flat / "Release").write_text(
        "Origin: sandbox-tests\nDate: Sun, 29 Nov 2026 00:00:00 UTC\nArchitectures: all\n"
        f"SHA256:\n {digest} {len(packages)} Packages\n"
    )
    root.chmod(0o755)


@pytest.fixture
def serve_repo(tmp_path: Path, base_image: str) -> Iterator[Callable[[str], Repo]]:
    """Factory: the test's repository served on a network of the given kind."""
    made: list[tuple[str, str]] = []

    def serve(kind: str) -> Repo:
        nonce = uuid.uuid4().hex[:10]
        package = f"sbx-hello-{nonce}"
        make_repository(tmp_path, package)
        name = f"sbx-repo-{nonce}"
        network = "bridge"
        if kind == "proxy":
            network = f"sbx-repo-net-{nonce}"
            docker("network", "create", "--internal", network)
        made.append((name, network))
        docker(
            "run", "-d", "--name", name, "--network", network, "-v", f"{tmp_path}:/repo:ro",
            "-w", "/repo", base_image, "python3", "-m", "http.server", "80",
        )  # fmt: skip
        probe = "import urllib.request as u; u.urlopen('http://127.0.0.1/flat/Release')"
        docker("exec", name, "sh", "-c", f'for i in $(seq 50); do python3 -c "{probe}" '
               "2>/dev/null && exit 0; sleep 0.2; done; exit 1")  # fmt: skip
        if kind == "proxy":
            docker("network", "connect", network, PROXY)
            return Repo(package, name, name, network)
        address = docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name)
        return Repo(package, address, name, network)

    yield serve
    for name, network in made:
        docker("rm", "-f", name, check=False)
        if network != "bridge":
            docker("network", "disconnect", "-f", network, PROXY, check=False)
            docker("network", "rm", network, check=False)


def install_fragment(repo: Repo) -> str:
    return (
        f'RUN echo "deb [trusted=yes] http://{repo.host}/ flat/" > /etc/apt/sources.list'
        " && rm -f /etc/apt/sources.list.d/*"
        f" && apt-get update && apt-get install -y --no-install-recommends {repo.package}\n"
        f"RUN {repo.package}\n"
    )


def build_on_a_new_service(config: ServerConfig, address: str, repo: Repo) -> list[str]:
    """The log of the package-installing build on a service of its own."""
    service = Service(config)
    service.listen(address)
    service.start()
    lines: list[str] = []
    try:
        with SandboxClient(address, retry_seconds=5.0) as client:
            client.build_image(install_fragment(repo), on_log=lines.append)
    finally:
        service.stop(grace=2.0)
    return lines


def test_a_package_installs_through_the_proxy(
    serve_repo: Callable[[str], Repo],
    short_tmp: Path,
    config_factory: Callable[..., ServerConfig],
) -> None:
    running = docker("inspect", "-f", "{{.State.Running}}", PROXY, check=False)
    assert running == "true", f"{PROXY} is not running: run scripts/host-setup.sh"
    repo = serve_repo("proxy")
    proxied = replace(DEFAULT_PROFILE, build_network="proxy")
    config = config_factory(profiles=(proxied, UNTRUSTED_PROFILE))
    lines = build_on_a_new_service(config, f"unix:{short_tmp}/build-proxy.sock", repo)
    assert f" ---> hello from {repo.package}" in lines
    proxy_address = docker(
        "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{repo.network}").IPAddress}}}}',
        PROXY,
    )  # fmt: skip
    assert repo.requesters() == {proxy_address}


def test_a_package_installs_under_the_single_user_default(
    serve_repo: Callable[[str], Repo],
    short_tmp: Path,
    config_factory: Callable[..., ServerConfig],
) -> None:
    repo = serve_repo("open")
    lines = build_on_a_new_service(config_factory(), f"unix:{short_tmp}/build-open.sock", repo)
    assert f" ---> hello from {repo.package}" in lines
