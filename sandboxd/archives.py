"""The one tar writer: files put into sandboxes and build contexts sent to the engine."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping

#: Content, or (content, mode); text is written as UTF-8 and mode 0 means `mode`'s default.
FileContent = bytes | str | tuple[bytes, int]


def tar_of(files: Mapping[str, FileContent], mode: int = 0o644) -> bytes:
    """A tar archive of {relative path: content}, byte-for-byte the same for the same
    input (mtime 0): a build context's bytes feed the engine's layer cache."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, value in files.items():
            content, file_mode = value if isinstance(value, tuple) else (value, 0)
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = file_mode or mode
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
