"""The host-mount policy and the marker's `mounts=` forms, without an engine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pytest_sandbox.spec import Defaults, resolve
from sandboxd.api import Mount
from sandboxd.config import DEFAULT_PROFILE, UNTRUSTED_PROFILE, ServerConfig, load_config
from sandboxd.engine.base import BindMount
from sandboxd.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from sandboxd.mounts import check_mounts
from sandboxd.tunnels import parse_ports

SCRATCH = ("/tmp", "/sandbox/work")


@pytest.fixture
def config(tmp_path: Path) -> ServerConfig:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "file.txt").write_text("x")
    (tmp_path / "out").mkdir()
    return ServerConfig(mount_roots=(tmp_path / "data",), writable_mount_roots=(tmp_path / "out",))


def check(config: ServerConfig, *mounts: Mount) -> tuple[BindMount, ...]:
    return check_mounts(mounts, DEFAULT_PROFILE, config, SCRATCH)


def test_allowed_mounts_resolve_and_default_to_read_only(config: ServerConfig) -> None:
    data, out = config.mount_roots[0], config.writable_mount_roots[0]
    binds = check(config, Mount(f"{data}/sub/"), Mount(str(out), "/o", writable=True))
    assert binds == (
        BindMount(str(data / "sub"), str(data / "sub"), read_only=True),
        BindMount(str(out), "/o", read_only=False),
    )


@pytest.mark.parametrize(
    ("mount", "error", "why"),
    [
        (Mount("relative/path"), InvalidArgument, r"source: 'relative/path' is not an absolute"),
        (Mount("/x/../y"), InvalidArgument, r"source: '/x/../y' has '..'"),
        (Mount("{data}", "/a:b"), InvalidArgument, r"target: '/a:b' has ':' or ','"),
        (Mount("{data}", "/a/../b"), InvalidArgument, r"target: '/a/../b' has '..'"),
        (Mount("{data}", "/proc/x"), InvalidArgument, r"/proc/x is reserved"),
        (Mount("{data}", "/"), InvalidArgument, r"/ is reserved"),
        (Mount("{data}", "/tmp"), InvalidArgument, r"/tmp is the sandbox's writable scratch"),
        (Mount("{data}/file.txt"), InvalidArgument, r"is not a directory on the server"),
        (Mount("{data}/missing"), InvalidArgument, r"is not a directory on the server"),
        (Mount("/etc"), PermissionDenied, r"/etc is not below a directory this server allows"),
        (Mount("{data}", writable=True), PermissionDenied, r"may only be mounted read-only"),
    ],
)
def test_refusals_name_the_field_and_path(
    config: ServerConfig, mount: Mount, error: type[Exception], why: str
) -> None:
    data = str(config.mount_roots[0])
    mount = Mount(mount.source.format(data=data), mount.target, mount.writable)
    with pytest.raises(error, match=why) as info:
        check(config, mount)
    if isinstance(info.value, InvalidArgument):
        assert info.value.violations[0].field.startswith("spec.mounts[0].")


def test_one_target_once(config: ServerConfig) -> None:
    data = str(config.mount_roots[0])
    with pytest.raises(InvalidArgument, match=r"mounts\[1\].target: /d is the target of another"):
        check(config, Mount(data, "/d"), Mount(f"{data}/sub", "/d"))


def test_a_root_that_is_a_symlink_still_allows_what_lies_below_it(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = ServerConfig(mount_roots=(tmp_path / "link",))
    (bind,) = check(config, Mount(str(tmp_path / "link"), "/m"))
    assert bind.source == str(tmp_path / "real")


def test_no_roots_no_mounts_and_untrusted_none_by_default(config: ServerConfig) -> None:
    with pytest.raises(PermissionDenied, match="allows no host mounts"):
        check(ServerConfig(), Mount("/srv"))
    with pytest.raises(PermissionDenied, match="'untrusted' does not allow host mounts"):
        check_mounts([Mount(str(config.mount_roots[0]))], UNTRUSTED_PROFILE, config, SCRATCH)
    assert not UNTRUSTED_PROFILE.allow_port_forward


def test_a_cluster_server_refuses_host_mounts(config: ServerConfig) -> None:
    cluster = replace(config, engine="cluster")
    with pytest.raises(FailedPrecondition, match="not available on a cluster") as info:
        check(cluster, Mount(str(config.mount_roots[0])))
    assert info.value.message.startswith("spec.mounts: ")
    assert check(cluster) == ()  # no mounts asked: nothing to refuse


def test_config_file_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'mount_roots = ["/srv/data"]\nwritable_mount_roots = ["/srv/out"]\n'
        '[[profiles]]\nname = "lab"\nallow_mounts = false\nallow_port_forward = false\n'
    )
    config = load_config(path)
    assert config.mount_roots == (Path("/srv/data"),)
    assert config.writable_mount_roots == (Path("/srv/out"),)
    lab = config.profile("lab")
    assert not lab.allow_mounts and not lab.allow_port_forward
    path.write_text('mount_roots = "/srv/data"\n')
    with pytest.raises(InvalidArgument, match="mount_roots: give a list of absolute paths"):
        load_config(path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/d", (Mount("/d"),)),
        (["/d:/in"], (Mount("/d", "/in"),)),
        (["/d:/in:rw", "/e:/f:ro"], (Mount("/d", "/in", True), Mount("/e", "/f"))),
        ([Mount("/d", writable=True)], (Mount("/d", writable=True),)),
    ],
)
def test_marker_mount_forms(value: object, expected: tuple[Mount, ...]) -> None:
    spec = resolve({"mounts": value}, Defaults(), {})
    assert spec.mounts == expected
    # a writable mount's output on the host would be scrubbed by a fork's reset
    assert spec.isolation == ("container" if any(m.writable for m in expected) else "fork")


@pytest.mark.parametrize("value", [["/d:/e:rx"], ["/a:/b:/c:rw"], [3], [""], 7])
def test_bad_marker_mounts(value: object) -> None:
    with pytest.raises(ValueError, match="mounts"):
        resolve({"mounts": value}, Defaults(), {})


@pytest.mark.parametrize(
    ("text", "ports"), [("8080:80", (8080, 80)), ("0:8000", (0, 8000)), ("9000", (9000, 9000))]
)
def test_port_pairs(text: str, ports: tuple[int, int]) -> None:
    assert parse_ports(text) == ports


@pytest.mark.parametrize("text", ["80:0", "x:80", "70000:80", "80:65536", ""])
def test_bad_port_pairs(text: str) -> None:
    with pytest.raises(InvalidArgument, match="ports: "):
        parse_ports(text)
