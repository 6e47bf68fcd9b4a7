"""Coverage measured inside a sandbox, taken into the host's pytest-cov data.

pytest-cov's controller combines its workers' data (xdist) and, when the test loop ends,
every parallel data file (`.coverage.<suffix>`) beside its own data file. A sandbox's
data file comes back with paths under the sandbox's project directory; it becomes one
more parallel file there, paths mapped to the host's files, so the host's own combine
counts routed tests exactly as it counts local ones.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any


def host_data_file(config: Any) -> Path | None:
    """The data file of the host's active pytest-cov controller; None without one."""
    plugin = config.pluginmanager.get_plugin("_cov")
    controller = getattr(plugin, "cov_controller", None)
    cov = getattr(controller, "cov", None)
    if cov is None:
        return None
    return Path(cov.config.data_file).resolve()


def path_mapper(sandbox_root: str, host_root: Path) -> Callable[[str], str]:
    """Map a path under the sandbox's project directory to the host's file; others unchanged."""
    root = PurePosixPath(sandbox_root)

    def map_path(path: str) -> str:
        candidate = PurePosixPath(path)
        if candidate == root or root in candidate.parents:
            return str(host_root.joinpath(*candidate.relative_to(root).parts))
        return path

    return map_path


def write_mapped(
    data: bytes, sandbox_root: str, host_root: Path, data_file: Path, tag: str
) -> Path:
    """Write a sandbox's coverage data file (its bytes) beside `data_file` as the parallel
    file `.coverage.sandbox.<tag>`, paths mapped to the host; return its path.

    Raises:
        coverage.exceptions.DataError: `data` is not a coverage data file.
    """
    from coverage import CoverageData  # only when pytest-cov is active on the host

    with tempfile.TemporaryDirectory(prefix="sbx-cov-") as tmp:
        source_file = Path(tmp, ".coverage")
        source_file.write_bytes(data)
        source = CoverageData(basename=str(source_file))
        source.read()
        target = CoverageData(basename=str(data_file), suffix=f"sandbox.{tag}")
        target.update(source, map_path=path_mapper(sandbox_root, host_root))
        target.write()
        filename = Path(target.data_filename())
        source.close()
        target.close()
    return filename
