import sys
from pathlib import Path

import pytest

# Locally (without --sandbox) the tests import demo from src/ too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

pytest_plugins = ["pytester"]


@pytest.fixture
def words() -> list[str]:
    return ["Hello", "Sandboxed", "World"]
