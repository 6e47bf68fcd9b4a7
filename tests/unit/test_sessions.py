"""The interactive exec's input checks, without an engine."""

from __future__ import annotations

import signal

import pytest

from sandboxd.api import ExecRequest, ExecStart, WindowSize
from sandboxd.errors import InvalidArgument
from sandboxd.sessions import check_start, signal_number


@pytest.mark.parametrize("name", ["INT", "SIGINT", "int", " sigint "])
def test_signal_names_with_or_without_sig(name: str) -> None:
    assert signal_number(name) == signal.SIGINT


@pytest.mark.parametrize("name", ["", "NOPE", "SIG_DFL", "_DFL", "9"])
def test_unknown_signal_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="signal: unknown signal name") as info:
        signal_number(name)
    assert info.value.field == "signal"


def start(**kwargs: object) -> ExecStart:
    return ExecStart(sandbox_id="s", request=ExecRequest(argv=["sh"]), **kwargs)  # type: ignore[arg-type]


def test_a_tty_needs_a_window() -> None:
    with pytest.raises(InvalidArgument, match="a TTY needs") as info:
        check_start(start(tty=True))
    assert info.value.field == "start.window"
    check_start(start(tty=True, window=WindowSize(24, 80)))


@pytest.mark.parametrize("rows, columns", [(0, 80), (24, 0), (10_001, 80)])
def test_a_window_out_of_range_is_refused(rows: int, columns: int) -> None:
    with pytest.raises(InvalidArgument, match="between 1 and 10000"):
        check_start(start(tty=True, window=WindowSize(rows, columns)))


def test_attaching_to_a_preload_is_refused() -> None:
    request = ExecRequest(argv=[], attach_preload=True)
    with pytest.raises(InvalidArgument, match="attach_preload"):
        check_start(ExecStart(sandbox_id="s", request=request))
