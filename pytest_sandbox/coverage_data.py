"""Coverage measured inside a sandbox, taken into the host's pytest-cov data.

pytest-cov's controller combines its workers' data (xdist) and, when the test loop ends,
every parallel data file (`.coverage.<suffix>`) beside its own data file. A sandbox's
data file comes back with paths under the sandbox's project directory; it becomes one
more parallel file there, paths mapped to the host's files, so the host's own combine
counts routed tests exactly as it counts local ones.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any


@dataclass(frozen=True)
class CoverageSpec:
    """What the worker measures (pytest-cov's options, paths as seen inside), and where
    its data joins the host's."""

    source: tuple[str, ...]
    branch: bool
    config_file: str | bool
    data_file: Path
    host_root: Path

    def worker_options(self, capture_dir: str) -> dict[str, Any]:
        """The worker request's `coverage` entry: its data file lives in the capture dir."""
        return {
            "data_file": f"{capture_dir}/.coverage",
            "source": list(self.source),
            "branch": self.branch,
            "config_file": self.config_file,
        }


def coverage_spec(config: Any, sandbox_root: str) -> CoverageSpec | None:
    """The worker's coverage options when pytest-cov measures on the host; else None.
    Host paths under the rootdir become sandbox paths; names and relative paths stay (the
    worker's cwd is the invocation dir's place in the sandbox)."""
    data_file = host_data_file(config)
    if data_file is None:
        return None
    controller = config.pluginmanager.get_plugin("_cov").cov_controller
    root = Path(config.rootpath)

    def inside(value: str) -> str:
        path = Path(value)
        if path.is_absolute() and (path == root or root in path.parents):
            return str(PurePosixPath(sandbox_root, *path.relative_to(root).parts))
        return value

    config_file = controller.cov_config
    return CoverageSpec(
        source=tuple(inside(str(s)) for s in controller.cov_source or ()),
        branch=bool(controller.cov_branch),
        config_file=inside(config_file) if isinstance(config_file, str) else bool(config_file),
        data_file=data_file,
        host_root=root,
    )


def data_from_tar(archive: bytes) -> bytes | None:
    """The coverage data file in a GetFiles archive of it; None when it is not there."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isfile() and os.path.basename(member.name) == ".coverage":
                f = tar.extractfile(member)
                return f.read() if f is not None else None
    return None


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
