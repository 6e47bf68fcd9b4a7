"""`sandboxd run` end to end: limits, verdicts, exit codes and measurements."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from sandboxd_cli import CliResult

Cli = Callable[..., CliResult]


def test_memory_hog_is_out_of_memory_and_exits_137(cli: Cli) -> None:
    r = cli("run", "--memory", "64m", "--json", "--", "python3", "-c", "b = bytearray(512 << 20)")
    assert r.returncode == 137, r.stderr
    result = r.json()
    assert result["verdict"] == "out_of_memory"
    assert result["exit_code"] == 137
    assert result["message"] == "out of memory (limit 64 MiB)"
    assert "out of memory (limit 64 MiB)" in r.stderr


def test_timeout_returns_fast_as_timed_out_with_124(cli: Cli) -> None:
    r = cli("run", "--timeout", "2", "--json", "--", "sleep", "60")
    assert r.returncode == 124, r.stderr
    result = r.json()
    assert result["verdict"] == "timed_out"
    assert result["exit_code"] == 124
    # Stopped at its timeout: not before it, and long before the command's own end.
    assert 2.0 <= result["wall_seconds"] < 60, result


def test_fork_loop_hits_the_process_limit_without_hurting_the_host(cli: Cli) -> None:
    loop = "i=0; while [ $i -lt 500 ]; do sleep 30 >/dev/null 2>&1 & i=$((i+1)); done; wait"
    r = cli("run", "--pids", "32", "--timeout", "8", "--json", "--", "sh", "-c", loop)
    result = r.json()
    assert result["verdict"] == "pids_exhausted" or r.returncode != 0, result
    assert result["verdict"] in ("pids_exhausted", "nonzero_exit"), result
    assert result["limits"]["pids"] == 32
    # The host still forks fine.
    assert subprocess.run(["true"], check=False).returncode == 0


def test_clean_command_passes_output_and_exit_code_through(cli: Cli) -> None:
    r = cli("run", "--json", "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
    assert r.returncode == 3
    assert r.stdout.splitlines()[0] == "to-stdout"
    assert "to-stderr" in r.stderr
    result = r.json()
    assert (result["verdict"], result["exit_code"]) == ("nonzero_exit", 3)
    assert result["image"] == "sandbox-base:bookworm"
    assert result["image_digest"].startswith("sha256:")
    assert result["output_truncated"] is False


def test_cpu_seconds_are_measured(cli: Cli) -> None:
    burn = "x = 0\nfor i in range(6_000_000): x += i"
    r = cli("run", "--cpus", "1", "--json", "--", "python3", "-c", burn)
    assert r.returncode == 0, r.stderr
    result = r.json()
    assert result["cpu_seconds"] > 0.3, result
    # One CPU cannot do more than wall-clock seconds of work (small slack for sampling).
    assert result["cpu_seconds"] <= result["wall_seconds"] * 1.0 + 0.2, result


def test_peak_memory_is_measured(cli: Cli) -> None:
    grab = "b = bytearray(120 << 20)"
    r = cli("run", "--memory", "256m", "--json", "--", "python3", "-c", grab)
    assert r.returncode == 0, r.stderr
    result = r.json()
    assert result["peak_memory_bytes"] > 100 << 20, result
    assert result["peak_memory_bytes"] <= 256 << 20, result


def test_small_command_has_small_peak(cli: Cli) -> None:
    r = cli("run", "--memory", "256m", "--json", "--", "true")
    assert r.json()["peak_memory_bytes"] < 50 << 20, "the peak is per command, not stale"


def test_run_with_a_dockerfile_fragment(cli: Cli, client: object) -> None:
    import uuid

    marker = uuid.uuid4().hex
    r = cli("run", "--dockerfile", f"RUN echo {marker} > /marker", "--json", "--", "cat", "/marker")
    result = r.json()
    try:
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0] == marker
        assert len(result["image"]) == 64
    finally:
        client.delete_image(result["image"])  # type: ignore[attr-defined]
