"""Fixtures for the unit tests: the fake engine with the base image, and an image store."""

from __future__ import annotations

import pytest
from fake_runtime import BASE, FakeRuntime

from sandboxd.images import ImageStore


@pytest.fixture
def runtime() -> FakeRuntime:
    rt = FakeRuntime()
    rt.add_image(BASE)
    return rt


@pytest.fixture
def store(runtime: FakeRuntime) -> ImageStore:
    return ImageStore(runtime, BASE)
