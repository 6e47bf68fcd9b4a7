"""Grading tests: courses written to a temporary folder, graded by the session's service."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.server import Service


@pytest.fixture
def address(service: Service) -> str:
    """The session service's address, for `sandboxd grade --address`."""
    return service.address


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """`files` (relative path -> text) under `root`; returns `root`."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
