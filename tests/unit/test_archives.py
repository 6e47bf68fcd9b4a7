from __future__ import annotations

import io
import tarfile

from sandboxd.api import requested_limits
from sandboxd.archives import tar_of
from sandboxd.limits import Limits


def test_tar_of_is_the_same_bytes_for_the_same_files() -> None:
    files = {"a.txt": "héllo", "bin/run": (b"#!/bin/sh\n", 0o755), "z": b"\x00"}
    data = tar_of(files)
    assert data == tar_of(dict(files))  # mtime 0: a build context feeds the layer cache
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert {n: m.mode for n, m in members.items()} == {
            "a.txt": 0o644,
            "bin/run": 0o755,
            "z": 0o644,
        }
        assert all(m.mtime == 0 for m in members.values())
        handle = tar.extractfile(members["a.txt"])
        assert handle is not None and handle.read() == "héllo".encode()


def test_requested_limits_leave_what_is_not_given_to_the_server() -> None:
    asked = requested_limits(memory_bytes=64 << 20)
    assert asked == Limits(0, 64 << 20, 0, 0, False, 0, 0)
    assert requested_limits(network=True).network is True
