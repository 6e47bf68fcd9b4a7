"""Fixtures for load tests: a `sandboxd serve` child in a short-pathed private directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sandboxd_process import _engine_and_base_image, sandboxd, sandboxd_defaults, short_dir

__all__ = ["_engine_and_base_image", "sandboxd", "sandboxd_defaults", "short_dir"]

pytestmark = pytest.mark.docker
