"""Writing a course or a submissions folder for a grading test, and a small pytest course
whose submissions pass, loop, eat memory or fail."""

from __future__ import annotations

from pathlib import Path


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """`files` (relative path -> text) under `root`; returns `root`."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


TESTS = {
    "test_calc.py": """
import pytest
from calc import add, fib, grow

@pytest.mark.points(2)
def test_add():
    assert add(2, 3) == 5

def test_fib_small():
    assert fib(10) == 55

@pytest.mark.points(3)
def test_fib_big():
    assert fib(30) == 832040

def test_grow():
    assert len(grow(10)) == 10

@pytest.mark.hidden
@pytest.mark.parametrize("a", [1, 2])
def test_secret(a):
    assert add(a, 0) == a
""",
}
GOOD = """
def add(a, b):
    return a + b

def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

def grow(n):
    return [0] * n
"""
#: fib(30) loops, grow() takes far more than the memory limit; the rest is right.
PARTIAL = GOOD.replace("    a, b = 0, 1\n", "    while n > 20:\n        pass\n    a, b = 0, 1\n", 1)
PARTIAL = PARTIAL.replace("return [0] * n", "return [bytearray(1 << 20) for _ in range(4096)]")
