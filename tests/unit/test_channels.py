"""Mapping a gRPC status back to the project's errors (no server: a status object)."""

from __future__ import annotations

import grpc

from sandboxd import errors
from sandboxd.channels import from_rpc_error


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


def test_the_callers_own_deadline_says_so_in_words() -> None:
    err = from_rpc_error(
        _Status(grpc.StatusCode.DEADLINE_EXCEEDED, "Stream removed (Deadline Exceeded)")
    )
    assert isinstance(err, errors.DeadlineExceeded)
    assert err.message.startswith("the call's deadline passed before sandboxd finished it")


def test_the_services_own_deadline_message_is_kept() -> None:
    said = "fragment line 2: the build's deadline of 60s passed"
    err = from_rpc_error(_Status(grpc.StatusCode.DEADLINE_EXCEEDED, said))
    assert isinstance(err, errors.DeadlineExceeded) and err.message == said


def test_an_unreachable_service_without_details_is_named() -> None:
    err = from_rpc_error(_Status(grpc.StatusCode.UNAVAILABLE, ""))
    assert isinstance(err, errors.EngineUnavailable)
    assert err.message == "sandboxd is not reachable"
