"""Fault tests: a `sandboxd serve` child the tests kill, signal and starve of its engine.

The engine-outage module is ordered last in the session: it stops dockerd, and every
other test needs it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "load"))

from sandboxd_process import _engine_and_base_image, sandboxd, short_dir

__all__ = ["_engine_and_base_image", "sandboxd", "short_dir"]

LAST = "test_fault_zz_engine_outage.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the engine-outage tests to the very end of the whole session."""
    items.sort(key=lambda item: item.path.name == LAST)


@pytest.fixture
def sandboxd_defaults() -> dict[str, Any]:
    """No pool, and a reaper that acts within the tests' short waits."""
    return {"pool_max_per_key": 0, "reap_interval_seconds": 1.0}
