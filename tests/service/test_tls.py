"""The server's own mTLS listener, reached end to end by the CLI, the plugin and the grader.

A throwaway CA is made per test module with the openssl CLI; the listener binds
127.0.0.1 port 0.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandboxd import cli
from sandboxd.config import ServerConfig
from sandboxd.server import Service, create_server

SERVER_EXT = "subjectAltName=IP:127.0.0.1,DNS:localhost\n"


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def _signed(name: str, cn: str, pki: Path, ext: str = "") -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=pki)  # fmt: skip
    extra = []
    if ext:
        (pki / f"{name}.ext").write_text(ext)
        extra = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", *extra, cwd=pki)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server cert for 127.0.0.1 and a client cert (CN alice), all made here."""
    pki = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "1", "-subj", "/CN=sandbox-test-ca", cwd=pki)  # fmt: skip
    _signed("server", "localhost", pki, SERVER_EXT)
    _signed("client", "alice", pki)
    return pki


@pytest.fixture(scope="module")
def mtls(pki: Path, config_factory: Callable[..., ServerConfig], base_image: str) -> Iterator[str]:
    """A real service whose only TCP listener requires client certificates."""
    config = config_factory(
        tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem"
    )
    svc: Service
    svc, address = create_server(config, "127.0.0.1:0")
    try:
        yield address
    finally:
        svc.stop(grace=2.0)


def _tls_args(pki: Path) -> list[str]:
    return ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"),
            "--tls-key", str(pki / "client.key")]  # fmt: skip


def test_cli_run_reaches_the_mtls_listener(
    mtls: str, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["run", "--address", mtls, *_tls_args(pki), "--json", "--", "echo", "over tls"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0] == "over tls"
    assert json.loads(out.splitlines()[-1])["verdict"] == "ok"


def test_a_client_without_a_certificate_is_refused_clearly(
    mtls: str, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["run", "--address", mtls, "--tls-ca", str(pki / "ca.pem"), "--", "true"])
    err = capsys.readouterr().err
    assert code != 0
    assert f"sandboxd at {mtls} refused the connection" in err, err
    assert "--tls-cert/--tls-key" in err, err
    assert "Traceback" not in err


def test_a_certificate_without_its_key_is_refused_before_connecting(
    mtls: str, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["info", "--address", mtls, "--tls-cert", str(pki / "client.pem")])
    err = capsys.readouterr().err
    assert code != 0
    assert "needs its key" in err, err


def test_grade_reaches_it_through_the_environment(
    mtls: str, pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOXD_TLS_CA", str(pki / "ca.pem"))
    monkeypatch.setenv("SANDBOXD_TLS_CERT", str(pki / "client.pem"))
    monkeypatch.setenv("SANDBOXD_TLS_KEY", str(pki / "client.key"))
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_one.py").write_text(
        "from one import one\n\ndef test_one():\n    assert one() == 1\n"
    )
    subs = tmp_path / "subs" / "alice"
    subs.mkdir(parents=True)
    (subs / "one.py").write_text("def one():\n    return 1\n")
    out = tmp_path / "results.json"
    code = cli.main([
        "grade", "--tests", str(tests), "--submissions", str(subs.parent), "--profile", "default",
        "--jobs", "1", "--out", str(out), "--address", mtls,
    ])  # fmt: skip
    assert code == 0
    (graded,) = json.loads(out.read_text())["submissions"]
    assert graded["verdict"] == "passed", graded


def test_the_plugin_reaches_it_through_the_environment(
    mtls: str, pki: Path, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOXD_TLS_CA", str(pki / "ca.pem"))
    monkeypatch.setenv("SANDBOXD_TLS_CERT", str(pki / "client.pem"))
    monkeypatch.setenv("SANDBOXD_TLS_KEY", str(pki / "client.key"))
    pytester.makepyfile(
        test_routed="""
import socket

def test_in_a_sandbox():
    assert socket.gethostname() == "sandbox"
"""
    )
    result = pytester.runpytest_subprocess("--sandbox=all", f"--sandbox-address={mtls}", "-v")
    result.stdout.fnmatch_lines(["sandbox: every test via *" + mtls + "*"])
    result.stdout.fnmatch_lines(["test_routed.py::test_in_a_sandbox PASSED*"])
    result.assert_outcomes(passed=1)
