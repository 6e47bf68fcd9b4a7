"""The `sandboxd` command line, run as a child process with this session's instance ids."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sandboxd_cli import SANDBOXD, CliResult


@pytest.fixture
def write_config(tmp_path: Path, instance_id_factory: Callable[[], str]) -> Callable[..., Path]:
    """Factory: a TOML config with a fresh session instance id (plus any extra settings)."""

    def write(**settings: object) -> Path:
        settings.setdefault("instance_id", instance_id_factory())
        lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
        path = tmp_path / f"sandboxd-{settings['instance_id']}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


@pytest.fixture
def cli(base_image: str, write_config: Callable[..., Path]) -> Callable[..., CliResult]:
    """Run `sandboxd --config <fresh instance> ARGS...` and return what it did."""

    def run(*args: str, timeout: float = 120.0) -> CliResult:
        config = write_config()
        started = time.monotonic()
        proc = subprocess.run(
            [SANDBOXD, "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)

    return run
