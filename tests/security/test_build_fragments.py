"""A fragment is read with Docker's own grammar: no spelling of FROM, `--from`, a mount,
a volume or a remote ADD gets past the check, and the refusal names the line."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from sandboxd import errors
from sandboxd.client import SandboxClient


class _Recorder(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        body = b"host-only secret\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, list[str]]]:
    """An HTTP server on the host's loopback only: (port, paths it was asked for)."""
    _Recorder.paths = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], _Recorder.paths
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("fragment", "line", "why"),
    [
        ("RUN true\nF\\\nROM sandbox-base:bookworm", 2, "FROM is not allowed"),
        ("RUN true\nfRoM\\\n  sandbox-base:bookworm", 2, "FROM is not allowed"),
        ("# escape=`\nRUN true\nF`\nROM sandbox-base:bookworm", 3, "FROM is not allowed"),
        ("COPY --from=sandbox-base:bookworm /etc/hostname /x", 1, "COPY --from"),
        ("RUN true\ncopy \\\n  --from=sandbox-base:bookworm /etc/hostname /x", 2, "COPY --from"),
        ("ADD --from=sandbox-base:bookworm /etc/hostname /x", 1, "ADD --from"),
        ("RUN --mount=type=bind,from=sandbox-base:bookworm,target=/m true", 1, "RUN --mount"),
        ("RUN --network=host true", 1, "RUN --network"),
        ("ONBUILD RUN true", 1, "ONBUILD is not allowed"),
        ("RUN true\nvolume /data", 2, "VOLUME is not allowed"),
    ],
)
def test_references_to_other_images_are_refused_with_the_line(
    client: SandboxClient, fragment: str, line: int, why: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match=rf"fragment line {line}: {why}"):
        client.build_image(fragment)


@pytest.mark.parametrize(
    "add",
    [
        "ADD http://127.0.0.1:{port}/secret /secret",
        "add \\\n  http://127.0.0.1:{port}/secret /secret",
        "ADD --chmod=644 HTTP://127.0.0.1:{port}/secret /secret",
    ],
)
def test_add_from_the_hosts_loopback_is_refused_and_never_fetched(
    client: SandboxClient, loopback_server: tuple[int, list[str]], add: str
) -> None:
    port, asked = loopback_server
    with pytest.raises(errors.InvalidArgument, match=r"fragment line 2: ADD from a URL"):
        client.build_image("RUN true\n" + add.format(port=port))
    assert asked == []
