"""Which service instances are alive, so a new one reaps only what dead ones left.

Each instance holds an exclusive flock on a file named after its id. The kernel
drops the lock when the process dies, however it dies (kill -9 included), so
"the lock can be taken" means "that instance is gone".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("SANDBOXD_INSTANCES_DIR", "/tmp/sandboxd-instances"))


class InstanceLock:
    def __init__(self, instance_id: str, directory: Path = DEFAULT_DIR) -> None:
        self.instance_id = instance_id
        self.directory = directory
        self._fd: int | None = None

    def acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / f"{self.instance_id}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.directory / f"{self.instance_id}.lock")
            os.close(self._fd)
            self._fd = None


def is_alive(instance_id: str, directory: Path = DEFAULT_DIR) -> bool:
    """True while the instance's process holds its lock."""
    if instance_id.strip(".") == "" or "/" in instance_id:
        return False
    path = directory / f"{instance_id}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return False
    finally:
        os.close(fd)
