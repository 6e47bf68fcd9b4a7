"""Grading tests: courses written to a temporary folder, graded by the session's service."""

from __future__ import annotations

import pytest

from sandboxd.server import Service


@pytest.fixture
def address(service: Service) -> str:
    """The session service's address, for `sandboxd grade --address`."""
    return service.address
