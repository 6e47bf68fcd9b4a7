"""`sandboxd serve` in a child process, so tests can measure it, signal it and kill it.

Shared by tests/load, tests/faults and benchmarks/load.py. Everything the child makes
(its socket, its TMPDIR, its log) lives under one directory the caller owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

BASE_IMAGE = os.environ.get("SANDBOXD_TEST_BASE_IMAGE", "sandbox-base:bookworm")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_config(path: Path, settings: Mapping[str, Any]) -> Path:
    """A TOML config: scalars at the top, dicts as tables (`caps`, `defaults`)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for table, values in settings.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def docker_lines(*args: str) -> list[str]:
    out = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def containers_of(instance_id: str) -> list[str]:
    """Ids of every container (running or not) labelled with this service instance."""
    return docker_lines("ps", "-aq", "--filter", f"label=sandbox.instance={instance_id}")


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class SandboxdProcess:
    """One `sandboxd serve` child listening on a unix socket in `root`."""

    def __init__(
        self,
        root: Path,
        settings: Mapping[str, Any] | None = None,
        *,
        grace: float = 5.0,
        name: str = "sandboxd",
    ) -> None:
        self.root = root
        self.name = name
        self.instance_id = f"t{uuid.uuid4().hex[:11]}"
        self.tmpdir = root / f"{name}-tmp"
        self.state_dir = root / f"{name}-state"
        self.socket = root / f"{name}.sock"
        self.log_path = root / f"{name}.log"
        self.grace = grace
        base = {
            "base_image": BASE_IMAGE,
            "instance_id": self.instance_id,
            "state_dir": str(self.state_dir),
        }
        self.settings = {**base, **(settings or {})}
        self.config_path = write_config(root / f"{name}.toml", self.settings)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_seconds = 0.0

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> SandboxdProcess:
        """Spawn and wait until the service answers health checks as SERVING."""
        from sandboxd.client import SandboxClient

        self.tmpdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(self.tmpdir), "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sandboxd.cli",
                "--config",
                str(self.config_path),
                "serve",
                "--listen",
                self.address,
                "--grace",
                str(self.grace),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        with SandboxClient(self.address, retry_seconds=timeout) as client:
            end = started + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sandboxd exited early:\n{self.log()}")
                try:
                    if client.health(timeout=1.0) == "SERVING":
                        break
                except Exception as exc:
                    if time.monotonic() > end:
                        msg = f"sandboxd did not serve in time:\n{self.log()}"
                        raise RuntimeError(msg) from exc
                    time.sleep(0.05)
        self.started_seconds = time.monotonic() - started
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    # -- measurements from /proc -----------------------------------------------

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def temp_files(self) -> list[str]:
        return sorted(str(p) for p in self.tmpdir.rglob("*"))

    # -- ending ---------------------------------------------------------------------

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def terminate(self, timeout: float | None = None) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout if timeout is not None else self.grace + 30)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        """End the child whatever state it is in, and remove what its instance left."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGCONT)
            try:
                self.terminate(timeout=self.grace + 20)
            except subprocess.TimeoutExpired:
                self.kill9()
        leftovers = containers_of(self.instance_id)
        if leftovers:
            subprocess.run(["docker", "rm", "-f", *leftovers], capture_output=True, check=False)


# Fixtures shared by the load and fault tests; each conftest imports them (and may
# override `sandboxd_defaults`).


@pytest.fixture(scope="session", autouse=True)
def _engine_and_base_image() -> None:
    """Fail (never skip) with a clear message when the engine or the base image is missing."""
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    assert info.returncode == 0, f"the Docker engine does not answer: {info.stderr.strip()}"
    image = subprocess.run(
        ["docker", "image", "inspect", BASE_IMAGE], capture_output=True, check=False
    )
    assert image.returncode == 0, (
        f"base image {BASE_IMAGE} is missing; run `sandboxd bootstrap-image` first"
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandboxd_defaults() -> dict[str, Any]:
    """Settings every `sandboxd` child of a directory gets unless a test says otherwise."""
    return {}


@pytest.fixture
def sandboxd(
    short_dir: Path, sandboxd_defaults: dict[str, Any]
) -> Iterator[Callable[..., SandboxdProcess]]:
    """Factory: `sandboxd(settings, grace=..)` starts a child; all are ended at teardown."""
    started: list[SandboxdProcess] = []

    def start(settings: dict[str, Any] | None = None, **kwargs: Any) -> SandboxdProcess:
        merged = {**sandboxd_defaults, **(settings or {})}
        proc = SandboxdProcess(short_dir, merged or settings, name=f"sbx{len(started)}", **kwargs)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.close()
