import os
import socket
import subprocess

import pytest
from demo import slugify

pytestmark = pytest.mark.sandbox(memory="128m", cpus=1.0, pids=64, timeout=30)


def test_slugify(words):
    assert slugify(" ".join(words)) == "hello-sandboxed-world"


def test_slugify_drops_punctuation():
    assert slugify("a, b; c!") == "a-b-c"


def _memory_limit() -> int:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        if os.path.exists(path):
            with open(path) as f:
                return int(f.read())
    raise AssertionError("no memory cgroup visible")


def test_runs_inside_a_limited_container():
    assert socket.gethostname() == "sandbox"
    assert _memory_limit() == 128 * 1024 * 1024
    assert os.listdir("/sys/class/net") == ["lo"]  # no network at all
    assert os.getuid() != 0
    print(f"hostname={socket.gethostname()} memory={_memory_limit() >> 20} MiB uid={os.getuid()}")


@pytest.mark.sandbox(
    dockerfile="RUN apt-get update && apt-get install -y --no-install-recommends jq"
    " && rm -rf /var/lib/apt/lists/*"
)
def test_tool_installed_by_a_dockerfile_fragment():
    out = subprocess.run(["jq", "-c", ".a"], input='{"a": [1, 2]}', capture_output=True, text=True)
    assert out.stdout.strip() == "[1,2]"
