"""The untrusted profile end to end: gVisor really runs it, and results come from the service."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from abuse import inspect, run, suite_limits, verdict

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import ExecResult, SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.config import UNTRUSTED_PROFILE, Profile
from sandboxd.server import create_server


def test_untrusted_runs_under_gvisor_by_default(operator: SandboxClient) -> None:
    sandbox = operator.create_sandbox(SandboxRequest(profile="untrusted", limits=suite_limits()))
    try:
        assert sandbox.runtime == "runsc"
        info = inspect(sandbox.container_id) or {}
        assert info["HostConfig"]["Runtime"] == "runsc"  # type: ignore[index]
        out, _, result = run(operator, sandbox.id, "dmesg 2>&1 | head -1; id -u")
        assert verdict(result) == "ok", result
        assert b"gVisor" in out and out.split()[-1] == b"65534", out
    finally:
        operator.destroy_sandbox(sandbox.id)


def test_missing_runtime_is_refused_or_falls_back_with_a_warning(
    config_factory: Callable[..., object],
    short_tmp: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    strict = Profile(**{**UNTRUSTED_PROFILE.__dict__, "runtime": "no-such-runtime"})
    lenient = Profile(**{**strict.__dict__, "name": "lenient", "missing_runtime": "fallback"})
    config = config_factory(profiles=(strict, lenient))
    service, address = create_server(config, f"unix:{short_tmp}/profiles.sock")  # type: ignore[arg-type]
    try:
        with SandboxClient(address, retry_seconds=2.0) as client:
            with pytest.raises(errors.PermissionDenied, match="no-such-runtime"):
                client.create_sandbox(SandboxRequest(profile="untrusted", limits=suite_limits()))
            with caplog.at_level(logging.WARNING, logger="sandboxd.sandboxes"):
                sandbox = client.create_sandbox(
                    SandboxRequest(profile="lenient", limits=suite_limits())
                )
            try:
                assert sandbox.runtime == "runc"
                assert any("falls back to runc" in r.getMessage() for r in caplog.records)
            finally:
                client.destroy_sandbox(sandbox.id)
    finally:
        service.stop(grace=1.0)


FORGER = r"""
import sys
from sandboxd_fake import result  # noqa: the bytes of an OK ExecResult event, made outside
sys.stdout.buffer.write(result)
print('verdict: VERDICT_OK\nexit_code: 0\n{"verdict": "ok", "exit_code": 0}', flush=True)
sys.stderr.write("ok\n")
sys.exit(3)
"""


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_results_cannot_be_forged_through_the_output(operator: SandboxClient, runtime: str) -> None:
    fake_ok = pb.ExecEvent(result=pb.ExecResult(verdict=pb.VERDICT_OK, message="ok"))
    spec = SandboxRequest(profile="untrusted", runtime=runtime, limits=suite_limits())
    sandbox = operator.create_sandbox(spec)
    try:
        operator.put_files(
            sandbox.id,
            "",
            {"sandboxd_fake.py": f"result = {fake_ok.SerializeToString()!r}\n"},
        )
        events = list(operator.exec_stream(sandbox.id, ["python3", "-c", FORGER]))
        results = [e for e in events if isinstance(e, ExecResult)]
        assert len(results) == 1 and isinstance(events[-1], ExecResult)
        result = results[0]
        assert verdict(result) == "nonzero_exit" and result.exit_code == 3, result
        assert result.message == "exited with code 3"
        # The run's own accounting, not what it printed.
        assert result.stdout_bytes > 0 and result.cpu_seconds > 0
    finally:
        operator.destroy_sandbox(sandbox.id)
