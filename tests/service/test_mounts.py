"""Host directory mounts through a real server and engine: allowed below the configured
roots only, read-only unless below a writable root, never for untrusted unless configured."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandboxd import errors
from sandboxd.api import ExecResult, Mount, SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.config import UNTRUSTED_PROFILE, Profile, ServerConfig
from sandboxd.limits import Limits
from sandboxd.server import create_server


def world_dir(parent: Path, name: str, mode: int) -> Path:
    """A directory the sandbox's user can read (and with 0o777, write)."""
    path = parent / name
    path.mkdir()
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def roots() -> Iterator[Path]:
    """data/ (read-only root) with a file, out/ (writable root), secret/ (not a root)."""
    top = Path(tempfile.mkdtemp(prefix="sbx-mounts-", dir="/tmp"))
    top.chmod(0o755)
    # Writable by everyone on the host: only the read-only mount keeps a sandbox from writing.
    data = world_dir(top, "data", 0o777)
    (data / "fixture.txt").write_text("fixture content\n")
    world_dir(data, "nested", 0o755)
    world_dir(top, "out", 0o777)
    secret = world_dir(top, "secret", 0o755)
    (secret / "key").write_text("do not read\n")
    (data / "escape").symlink_to(secret)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def mounting(
    roots: Path, config_factory: Callable[..., ServerConfig], short_tmp: Path
) -> Iterator[SandboxClient]:
    """A client of a service whose config allows mounts below data/ and, writable, out/."""
    allowing = Profile(**{**UNTRUSTED_PROFILE.__dict__, "name": "jail", "allow_mounts": True})
    config = config_factory(
        mount_roots=(roots / "data",),
        writable_mount_roots=(roots / "out",),
        profiles=(*config_factory().profiles, allowing),
    )
    service, address = create_server(config, f"unix:{short_tmp}/mounts.sock")
    try:
        with SandboxClient(address, retry_seconds=2.0) as client:
            yield client
    finally:
        service.stop(grace=1.0)


def sh(client: SandboxClient, sandbox_id: str, script: str) -> tuple[str, ExecResult]:
    out = bytearray()
    result = client.exec(sandbox_id, ["sh", "-c", script], on_output=lambda _, d: out.extend(d))
    return out.decode(), result


@pytest.fixture
def make_box(
    mounting: SandboxClient, limits_factory: Callable[..., Limits]
) -> Iterator[Callable[..., str]]:
    made: list[str] = []

    def make(*mounts: Mount, profile: str = "") -> str:
        box = mounting.create_sandbox(
            SandboxRequest(limits=limits_factory(pids=32), mounts=mounts, profile=profile)
        )
        made.append(box.id)
        return box.id

    yield make
    for sandbox_id in made:
        mounting.destroy_sandbox(sandbox_id)


def test_an_allowed_directory_is_readable_and_read_only_by_default(
    mounting: SandboxClient, make_box: Callable[..., str], roots: Path
) -> None:
    data = str(roots / "data")
    box = make_box(Mount(data, "/data"), Mount(f"{data}/nested"))
    out, result = sh(mounting, box, "cat /data/fixture.txt")
    assert result.verdict == "ok" and out == "fixture content\n"
    out, result = sh(mounting, box, "exec 2>&1; echo x > /data/new")
    assert result.exit_code != 0 and "Read-only file system" in out, out
    assert not (roots / "data" / "new").exists()
    # nosuid and nodev, as the kernel sees the mount
    out, _ = sh(mounting, box, "grep ' /data ' /proc/self/mountinfo")
    assert {"ro", "nosuid", "nodev"} <= set(out.split()[5].split(",")), out
    # without a target, the same path as on the host
    out, result = sh(mounting, box, f"test -d {data}/nested && echo there")
    assert out == "there\n", out


def test_writable_when_below_a_writable_root(
    mounting: SandboxClient, make_box: Callable[..., str], roots: Path
) -> None:
    out_dir = roots / "out"
    box = make_box(Mount(str(out_dir), "/sandbox/work/out", writable=True))
    _, result = sh(mounting, box, "echo result > /sandbox/work/out/answer.txt")
    assert result.verdict == "ok", result
    assert (out_dir / "answer.txt").read_text() == "result\n"
    (out_dir / "answer.txt").unlink()


def test_writable_is_refused_below_a_read_only_root(
    mounting: SandboxClient, roots: Path, limits_factory: Callable[..., Limits]
) -> None:
    request = SandboxRequest(
        limits=limits_factory(), mounts=(Mount(str(roots / "data"), writable=True),)
    )
    with pytest.raises(errors.PermissionDenied, match=r"data may only be mounted read-only"):
        mounting.create_sandbox(request)


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("secret", r"secret is not below a directory this server allows mounting$"),
        ("data/escape", r"escape is not below .* \(after following symlinks\)"),
        ("/etc", r"/etc is not below a directory this server allows mounting"),
    ],
)
def test_refused_outside_the_allowlist_naming_the_path(
    mounting: SandboxClient,
    roots: Path,
    limits_factory: Callable[..., Limits],
    source: str,
    why: str,
) -> None:
    path = source if source.startswith("/") else str(roots / source)
    request = SandboxRequest(limits=limits_factory(), mounts=(Mount(path, "/m"),))
    with pytest.raises(errors.PermissionDenied, match=why) as info:
        mounting.create_sandbox(request)
    assert path in info.value.message


def test_a_path_with_dotdot_is_refused(
    mounting: SandboxClient, roots: Path, limits_factory: Callable[..., Limits]
) -> None:
    sneaky = f"{roots}/data/../secret"
    request = SandboxRequest(limits=limits_factory(), mounts=(Mount(sneaky, "/m"),))
    with pytest.raises(errors.InvalidArgument, match=r"spec.mounts\[0\].source: .* has '..'"):
        mounting.create_sandbox(request)


def test_refused_for_untrusted_on_a_server_that_does_not_configure_it(
    client: SandboxClient, roots: Path, limits_factory: Callable[..., Limits]
) -> None:
    request = SandboxRequest(
        profile="untrusted", limits=limits_factory(), mounts=(Mount(str(roots / "data")),)
    )
    with pytest.raises(errors.PermissionDenied, match="'untrusted' does not allow host mounts"):
        client.create_sandbox(request)
    # and a server without mount roots refuses every mount
    with pytest.raises(errors.PermissionDenied, match="allows no host mounts"):
        client.create_sandbox(SandboxRequest(limits=limits_factory(), mounts=request.mounts))


def test_a_profile_configured_for_mounts_gets_them_under_gvisor(
    mounting: SandboxClient, make_box: Callable[..., str], roots: Path
) -> None:
    box = make_box(Mount(str(roots / "data"), "/data"), profile="jail")
    out, result = sh(mounting, box, "exec 2>&1; cat /data/fixture.txt; echo x > /data/new")
    assert out.startswith("fixture content\n") and "Read-only file system" in out, out
    assert result.exit_code != 0
    assert not (roots / "data" / "new").exists()


def test_the_server_tells_clients_what_it_allows(mounting: SandboxClient, roots: Path) -> None:
    info = mounting.server_info()
    assert info.mount_roots == (str(roots / "data"),)
    assert info.writable_mount_roots == (str(roots / "out"),)
    allowed = {p.name: (p.allow_mounts, p.allow_port_forward) for p in info.profiles}
    assert allowed == {"default": (True, True), "untrusted": (False, False), "jail": (True, False)}


def test_on_podman_too_read_only_and_writable_mounts_are_nosuid_nodev(
    roots: Path,
    config_factory: Callable[..., ServerConfig],
    limits_factory: Callable[..., Limits],
    short_tmp: Path,
) -> None:
    config = config_factory(
        engine="podman", mount_roots=(roots / "data",), writable_mount_roots=(roots / "out",)
    )
    service, address = create_server(config, f"unix:{short_tmp}/mounts-podman.sock")
    try:
        with SandboxClient(address, retry_seconds=2.0) as client:
            mounts = (Mount(str(roots / "data"), "/data"), Mount(str(roots / "out"), "/o", True))
            with client.sandbox(SandboxRequest(limits=limits_factory(), mounts=mounts)) as box:
                out, _ = sh(client, box.id, "grep -E ' /(data|o) ' /proc/self/mountinfo")
                flags = {
                    line.split()[4]: set(line.split()[5].split(",")) for line in out.splitlines()
                }
                assert {"ro", "nosuid", "nodev"} <= flags["/data"], out
                assert {"rw", "nosuid", "nodev"} <= flags["/o"], out
                out, result = sh(client, box.id, "cat /data/fixture.txt; echo x > /o/podman.txt")
                assert out == "fixture content\n" and result.verdict == "ok", (out, result)
        assert (roots / "out" / "podman.txt").read_text() == "x\n"
        (roots / "out" / "podman.txt").unlink()
    finally:
        service.stop(grace=1.0)
