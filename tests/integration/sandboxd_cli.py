"""Running the `sandboxd` command line as a child process."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SANDBOXD = str(Path(sys.executable).with_name("sandboxd"))


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> dict[str, Any]:
        """The JSON object `--json` prints on stdout's last line."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert lines, f"no output; stderr: {self.stderr}"
        return json.loads(lines[-1])  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Whether `predicate` became true within `timeout` seconds (polled every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
