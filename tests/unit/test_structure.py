"""The package's shape: imports run one way, and generated types stop at the adapters.

Imports are read from the source with `ast`, so an import inside a function or under
`TYPE_CHECKING` counts like any other: a cycle hidden that way is still a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "sandboxd"
GENERATED = "sandboxd._proto"
#: The only modules that may import the generated stubs: the gRPC adapters.
PROTO_USERS = {"sandboxd.client", "sandboxd.service", "sandboxd.server", "sandboxd.wire"}
#: The only modules that may import grpc: the adapters and the auth interceptor.
GRPC_USERS = PROTO_USERS | {"sandboxd.auth", "sandboxd.channels"}
GRPC_PACKAGES = ("grpc", "grpc_health", "grpc_reflection", "grpc_status")


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> source file, for every module of `package` under `root`."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_names(module: str, path: Path, known: Collection[str] = ()) -> Iterator[str]:
    """Every module name `module` imports, anywhere in its source (functions included).

    `from pkg import name` counts as importing `pkg.name` when that is one of the `known`
    modules, else as importing `pkg`; with no `known` modules, both are yielded.
    """
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if not known or submodule in known:
                    yield submodule
                if submodule not in known:
                    yield base


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (generated stubs left out)."""
    files = {m: p for m, p in module_files(root, package).items() if not m.startswith(GENERATED)}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = {name for name in imported_names(module, path, files) if name in files}
        graph[module] = targets - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def importers(root: Path, packages: tuple[str, ...], prefixes: tuple[str, ...]) -> set[str]:
    """Modules of `packages` that import anything under one of `prefixes`."""
    found: set[str] = set()
    for package in packages:
        for module, path in module_files(root, package).items():
            if module.startswith(GENERATED):
                continue
            names = imported_names(module, path)
            if any(n == p or n.startswith(p + ".") for n in names for p in prefixes):
                found.add(module)
    return found


def test_sandboxd_has_no_import_cycle() -> None:
    graph = import_graph(ROOT, PACKAGE)
    assert "sandboxd.sandboxes" in graph and "sandboxd.pool" in graph  # it read the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_generated_types_stop_at_the_adapters() -> None:
    users = importers(ROOT, (PACKAGE, "pytest_sandbox"), (GENERATED,))
    assert users >= PROTO_USERS  # the check sees the adapters' own imports
    unexpected = users - PROTO_USERS
    assert not unexpected, f"generated sandboxd._proto types imported by {sorted(unexpected)}"


def test_grpc_stops_at_the_adapters_and_auth() -> None:
    users = importers(ROOT, (PACKAGE, "pytest_sandbox"), GRPC_PACKAGES)
    assert "sandboxd.server" in users
    assert users <= GRPC_USERS, f"grpc imported by {sorted(users - GRPC_USERS)}"


@pytest.mark.parametrize("module", ["worker", "pristine", "debugger"])
def test_the_in_sandbox_modules_import_nothing_of_ours(module: str) -> None:
    path = ROOT / "pytest_sandbox" / f"{module}.py"
    ours = [
        n
        for n in imported_names(f"pytest_sandbox.{module}", path)
        if n.split(".")[0] in (PACKAGE, "pytest_sandbox")
    ]
    assert ours == []


# -- the checks themselves, on a made-up package ------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "hidden",
    [
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n",
        "def f():\n    from pkg import a\n",
        "from . import a\n",
        "import pkg.a\n",
    ],
)
def test_a_cycle_is_found_however_the_import_is_written(tmp_path: Path, hidden: str) -> None:
    root = _package(
        tmp_path,
        {"__init__.py": "", "a.py": "from pkg.b import B\n", "b.py": hidden},
    )
    assert find_cycle(import_graph(root, "pkg")) in (
        ["pkg.a", "pkg.b", "pkg.a"],
        ["pkg.b", "pkg.a", "pkg.b"],
    )


def test_one_way_imports_are_no_cycle(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "from pkg import a\n",
            "a.py": "from pkg.b import B\nfrom pkg import c\n",
            "b.py": "from .c import C\n",
            "c.py": "import os\n",
        },
    )
    assert find_cycle(import_graph(root, "pkg")) is None
