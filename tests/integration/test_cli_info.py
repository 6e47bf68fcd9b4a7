"""`sandboxd info`: what the server offers, as JSON, from the server's own config."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from sandboxd_cli import SANDBOXD

from sandboxd.server import Service


def test_info_prints_the_configured_caps_as_json(
    base_image: str, write_config: Callable[..., Path]
) -> None:
    config = write_config()
    with config.open("a") as f:
        f.write("[caps]\ntimeout_seconds = 90.0\nttl_seconds = 900.0\n")
    proc = subprocess.run(
        [SANDBOXD, "--config", str(config), "info"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["caps"]["timeout_seconds"] == 90.0
    assert info["caps"]["ttl_seconds"] == 900.0
    assert info["engine"] == "docker" and "runc" in info["runtimes"]
    assert info["api_version"] == "sandbox.v1"


def test_info_asks_a_running_server_at_address(
    service: Service, write_config: Callable[..., Path]
) -> None:
    proc = subprocess.run(
        [SANDBOXD, "--config", str(write_config()), "info", "--address", service.address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["caps"]["timeout_seconds"] == service.config.caps.timeout_seconds
    assert {p["name"] for p in info["profiles"]} >= {"default", "untrusted"}
