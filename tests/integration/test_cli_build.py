"""`sandboxd build`: content-addressed images, the second build answered from the cache."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable

from sandboxd_cli import CliResult

from sandboxd.client import SandboxClient


def test_building_the_same_fragment_twice_is_one_image_and_a_cache_hit(
    cli: Callable[..., CliResult], client: SandboxClient
) -> None:
    fragment = f"RUN echo {uuid.uuid4().hex} > /marker"
    first = cli("build", "--dockerfile", fragment)
    assert first.returncode == 0, first.stderr
    built = json.loads(first.stdout.splitlines()[-1])
    try:
        assert built["cache_hit"] is False
        # A different instance (a fresh process) still finds it: the cache lives in the engine.
        second = cli("build", "--dockerfile", fragment + "\n")
        assert second.returncode == 0, second.stderr
        again = json.loads(second.stdout.splitlines()[-1])
        assert again["cache_hit"] is True
        assert again["key"] == built["key"]
        assert again["digest"] == built["digest"], "no new image was made"
        assert "Step 1/" not in second.stderr, "no build log on a cache hit"
        listed = subprocess.run(
            ["docker", "images", "-q", "--filter", f"label=sandbox.image-key={built['key']}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert len(listed) == 1, listed
    finally:
        client.delete_image(built["key"])
