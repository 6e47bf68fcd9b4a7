"""Wall time of one 50-test module: local, --sandbox scope=test, --sandbox scope=module.

    python examples/bench_scopes.py

All three runs happen here, one after the other, after one warm-up run that
builds (and caches) the image, so the numbers compare like with like.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULE = "\n".join(
    ["import pytest", ""]
    + [
        f"def test_{i:02d}():\n    assert sum(range({i})) == {i * (i - 1) // 2}\n"
        for i in range(50)
    ]
)


def run(project: Path, *args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    print(f"  {' '.join(args) or '(local)':45s} {elapsed:6.2f} s   {last}")
    if "50 passed" not in proc.stdout:
        raise SystemExit(proc.stdout + proc.stderr)
    return elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "test_fifty.py").write_text(MODULE)
        print("warm-up (builds the image once):")
        run(project, "--sandbox=all", "--sandbox-scope=module")
        print("measured:")
        local = run(project)
        per_test = run(project, "--sandbox=all", "--sandbox-scope=test")
        per_module = run(project, "--sandbox=all", "--sandbox-scope=module")
        print(
            f"local {local:.2f} s, scope=test {per_test:.2f} s ({per_test / local:.1f}x), "
            f"scope=module {per_module:.2f} s ({per_module / local:.1f}x)"
        )


if __name__ == "__main__":
    main()
