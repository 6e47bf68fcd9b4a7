"""Fixtures for the unit tests: the fake engine with the base image, and an image store."""

from __future__ import annotations

import pytest
from fake_engine import BASE, FakeBuilder, FakeEngine

from sandboxd.images import ImageStore


@pytest.fixture
def engine() -> FakeEngine:
    rt = FakeEngine()
    rt.add_image(BASE)
    return rt


@pytest.fixture
def store(engine: FakeEngine) -> ImageStore:
    return ImageStore(engine, BASE, builder=FakeBuilder(engine))
