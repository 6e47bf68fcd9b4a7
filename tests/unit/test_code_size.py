"""Size limits that keep the code readable: a function reads on one screen, a module
holds one responsibility. A file may exceed the limit only when its module docstring
says why (a line starting with "Size:")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sandboxd", "pytest_sandbox")
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 450


def _sources() -> list[Path]:
    return sorted(
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "_proto" not in path.parts
    )


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = node.body
    if (
        len(body) > 1
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    end = node.end_lineno or node.lineno
    return end - body[0].lineno + 1


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_read_on_one_screen(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    long = [
        f"{node.name} (line {node.lineno}): {_body_lines(node)} lines"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _body_lines(node) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small_or_say_why(path: Path) -> None:
    text = path.read_text()
    lines = text.count("\n")
    docstring = ast.get_docstring(ast.parse(text)) or ""
    explained = any(line.startswith("Size:") for line in docstring.splitlines())
    assert lines <= MAX_FILE_LINES or explained, (
        f"{lines} lines (limit {MAX_FILE_LINES}); split it by responsibility or say why "
        'in a "Size:" line of the module docstring'
    )


def test_the_checks_see_the_code() -> None:
    # Guards against a path change that would make the checks above vacuous.
    names = {p.name for p in _sources()}
    assert {"service.py", "plugin.py", "worker.py"} <= names
