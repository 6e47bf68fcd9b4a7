"""Running the `sandboxd` command line as a child process."""

from __future__ import annotations

import json
import sys
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
