from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import IO

import pytest

from sandboxd import bootstrap
from sandboxd.errors import BuildFailed, FailedPrecondition, InvalidArgument

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the base tree is chowned to the sandbox user, which needs root"
)

# Stands in for debootstrap: writes a tiny tree shaped like minbase, or fails the way
# the real one does. FAKE_MODE picks the behaviour; the argv is recorded for checks.
FAKE_DEBOOTSTRAP = textwrap.dedent(
    """\
    #!{python}
    import os, sys
    from pathlib import Path
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    Path(os.environ["FAKE_ARGV"]).write_text("\\n".join(sys.argv[1:]))
    mode = os.environ.get("FAKE_MODE", "ok")
    print("I: Retrieving InRelease", flush=True)
    if mode == "unreachable":
        print("E: Failed getting release file " + args[2] + "/dists/" + args[0] + "/InRelease")
        sys.exit(1)
    if mode == "noscript":
        print("E: No such script: /usr/share/debootstrap/scripts/" + args[0])
        sys.exit(1)
    root = Path(args[1])
    files = {{
        "usr/bin/tar": "",
        "etc/passwd": "root:x:0:0:root:/root:/bin/bash\\nold:x:1000:1000::/home/old:/bin/sh\\n",
        "etc/group": "root:x:0:\\nold:x:1000:\\n",
        "etc/shadow": "root:*:19000:0:99999:7:::\\n",
        "etc/resolv.conf": "nameserver 192.0.2.1\\n",
        "usr/share/doc/libc6/copyright": "licence",
        "usr/share/doc/libc6/changelog.gz": "x" * 1000,
        "usr/share/man/man1/tar.1.gz": "x",
        "usr/share/locale/locale.alias": "alias",
        "usr/share/locale/de/LC_MESSAGES/tar.mo": "x",
        "var/cache/apt/archives/tar_1.34_amd64.deb": "x" * 1000,
        "var/cache/apt/pkgcache.bin": "x",
        "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease": "x",
        "var/cache/debconf/config.dat": "keep",
        "var/cache/debconf/config.dat-old": "drop",
        "var/log/dpkg.log": "installed things",
    }}
    if mode != "nopython":
        files["usr/bin/python3"] = ""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    os.chmod(root / "etc/shadow", 0o640)
    print("I: Base system installed successfully.")
    """
)


class FakeEngine:
    """Reads the streamed archive like the engine would and remembers what it got."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.members: dict[str, tarfile.TarInfo] = {}
        self.contents: dict[str, bytes] = {}
        self.calls: list[tuple[str, dict[str, str], list[str]]] = []

    def import_image(
        self, fileobj: IO[bytes], tag: str, labels: dict[str, str], changes: list[str]
    ) -> str:
        self.calls.append((tag, labels, changes))
        if self.fail:
            raise bootstrap.SandboxError("engine said no")
        with tarfile.open(fileobj=fileobj, mode="r|") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                self.members[name] = member
                if member.isfile():
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    self.contents[name] = extracted.read()
        return "sha256:" + "ab" * 32


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "debootstrap"
    script.write_text(FAKE_DEBOOTSTRAP.format(python=sys.executable))
    script.chmod(0o755)
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(b"")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ARGV", str(tmp_path / "argv"))
    monkeypatch.setenv("SANDBOX_BOOTSTRAP_TMPDIR", str(work))
    monkeypatch.setattr(bootstrap, "KEYRING", keyring)
    return tmp_path


def leftovers(fake: Path) -> list[Path]:
    return list((fake / "work").iterdir())


@needs_root
def test_builds_trimmed_tree_with_sandbox_user(fake: Path) -> None:
    engine = FakeEngine()
    lines: list[str] = []

    image = bootstrap.make_base_image(
        engine, tag="base:test", include=("curl", "python3"), on_log=lines.append
    )

    assert image.startswith("sha256:")
    argv = (fake / "argv").read_text().splitlines()
    assert argv[0] == "--variant=minbase"
    assert "--include=python3,tar,curl" in argv
    assert argv[-3] == "bookworm"
    assert argv[-1] == "http://deb.debian.org/debian"
    assert "I: Base system installed successfully." in lines

    [(tag, labels, changes)] = engine.calls
    assert tag == "base:test"
    assert labels == {"sandbox.managed": "1", "sandbox.role": "base"}
    assert 'CMD ["python3"]' in changes
    assert "ENV LANG=C.UTF-8" in changes

    names = set(engine.members)
    assert {"usr/bin/python3", "usr/bin/tar", "usr/share/doc/libc6/copyright"} <= names
    assert {"var/cache/apt/archives/partial", "var/lib/apt/lists/partial"} <= names
    assert "etc/resolv.conf" not in names
    assert not any(n.endswith((".deb", ".bin", "changelog.gz", ".mo", "-old")) for n in names)
    assert not any(n.startswith(("usr/share/man/", "var/lib/apt/lists/deb")) for n in names)
    assert engine.contents["var/cache/debconf/config.dat"] == b"keep"
    assert engine.contents["var/log/dpkg.log"] == b""

    passwd = engine.contents["etc/passwd"].decode().splitlines()
    assert "sandbox:x:1000:1000:sandbox:/sandbox/work:/bin/sh" in passwd
    assert not any(line.startswith("old:") for line in passwd)
    assert "sandbox:x:1000:" in engine.contents["etc/group"].decode().splitlines()
    assert engine.contents["etc/shadow"].decode().endswith("sandbox:!:19000:0:99999:7:::\n")
    assert engine.members["etc/shadow"].mode == 0o640
    home = engine.members["sandbox/work"]
    assert home.isdir()
    assert (home.uid, home.gid, home.mode) == (1000, 1000, 0o755)
    assert engine.members["sandbox"].uid == 0
    assert leftovers(fake) == []


@needs_root
def test_unreachable_mirror_names_the_mirror_and_cleans_up(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODE", "unreachable")
    engine = FakeEngine()

    with pytest.raises(BuildFailed, match=r"(?s)cannot download.*http://mirror\.invalid/debian"):
        bootstrap.make_base_image(engine, mirror="http://mirror.invalid/debian")

    assert engine.calls == []
    assert leftovers(fake) == []


@needs_root
def test_unknown_suite_is_invalid_argument(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "noscript")
    with pytest.raises(InvalidArgument, match="does not know 'nosuchsuite'"):
        bootstrap.make_base_image(FakeEngine(), suite="nosuchsuite")
    assert leftovers(fake) == []


@needs_root
def test_tree_without_python_is_refused(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "nopython")
    with pytest.raises(BuildFailed, match="usr/bin/python3 is missing"):
        bootstrap.make_base_image(FakeEngine())
    assert leftovers(fake) == []


@needs_root
def test_engine_failure_propagates_and_cleans_up(fake: Path) -> None:
    with pytest.raises(bootstrap.SandboxError, match="engine said no"):
        bootstrap.make_base_image(FakeEngine(fail=True))
    assert leftovers(fake) == []


@needs_root
def test_failing_log_callback_stops_debootstrap_and_cleans_up(fake: Path) -> None:
    def explode(line: str) -> None:
        raise RuntimeError("callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):
        bootstrap.make_base_image(FakeEngine(), on_log=explode)
    assert leftovers(fake) == []


def test_missing_debootstrap_says_how_to_install(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(fake / "work"))
    with pytest.raises(FailedPrecondition, match=r"apt-get install debootstrap"):
        bootstrap.make_base_image(FakeEngine())


def test_missing_keyring_refuses_unverified_downloads(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bootstrap, "KEYRING", fake / "absent.gpg")
    with pytest.raises(FailedPrecondition, match="debian-archive-keyring"):
        bootstrap.make_base_image(FakeEngine())


def test_non_root_is_told_to_run_as_root(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(FailedPrecondition, match="needs root"):
        bootstrap.make_base_image(FakeEngine())
    assert leftovers(fake) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"suite": "Bookworm; rm -rf /"}, "suite"),
        ({"mirror": "deb.debian.org/debian"}, "mirror"),
        ({"mirror": "--foreign"}, "mirror"),
        ({"include": ("python3", "--no-check-gpg")}, "include"),
        ({"tag": "two words"}, "tag"),
        ({"tag": ""}, "tag"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(
    fake: Path, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        bootstrap.make_base_image(FakeEngine(), **kwargs)  # type: ignore[arg-type]
    assert not (fake / "argv").exists()


def test_include_as_comma_separated_string() -> None:
    assert bootstrap._packages("curl, python3") == ["python3", "tar", "curl"]


BASE_IMAGE = os.environ.get("SANDBOX_BASE_IMAGE", bootstrap.DEFAULT_TAG)


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.docker
def test_real_base_image_has_python_tar_and_the_sandbox_user() -> None:
    if shutil.which("docker") is None or _docker("info").returncode != 0:
        if os.environ.get("SANDBOX_REQUIRE_DOCKER"):
            pytest.fail("no Docker engine answers (run scripts/host-setup.sh)")
        pytest.skip("no Docker engine answers")
    if _docker("image", "inspect", BASE_IMAGE).returncode != 0:
        pytest.fail(
            f"{BASE_IMAGE} is missing: run scripts/host-setup.sh (or sandboxd bootstrap-image)"
        )
    script = "import sys, os, pwd; print(sys.version_info[0], pwd.getpwuid(os.getuid()).pw_dir)"
    out = _docker(
        "run",
        "--rm",
        "--pull=never",
        "--network=none",
        "--user=1000",
        BASE_IMAGE,
        "python3",
        "-c",
        script,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "/sandbox/work"]
    out = _docker("run", "--rm", "--pull=never", "--network=none", BASE_IMAGE, "tar", "--version")
    assert out.returncode == 0, out.stderr
    assert "GNU tar" in out.stdout
    labels = _docker("image", "inspect", "--format", "{{json .Config.Labels}}", BASE_IMAGE)
    assert '"sandbox.role":"base"' in labels.stdout
