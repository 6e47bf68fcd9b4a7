from __future__ import annotations

from dataclasses import replace
from typing import get_args

import pytest

from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.limits import MiB
from sandboxd.verdicts import (
    VERDICTS,
    Facts,
    Observation,
    StoppedVerdict,
    Verdict,
    by_wire,
    judge,
    signal_name,
)

CLEAN = Observation(
    exit_code=0,
    timed_out=False,
    timeout_seconds=2.0,
    output_truncated=False,
    output_limit=16 * MiB,
    oom_kills=0,
    pids_max_events=0,
    container_alive=True,
    memory_limit=64 * MiB,
    pids_limit=32,
)


def test_clean_exit_is_ok() -> None:
    j = judge(CLEAN)
    assert (j.verdict, j.exit_code, j.signal, j.message) == ("ok", 0, 0, "ok")


def test_nonzero_exit_names_the_code() -> None:
    j = judge(replace(CLEAN, exit_code=3))
    assert (j.verdict, j.exit_code, j.signal) == ("nonzero_exit", 3, 0)
    assert j.message == "exited with code 3"


def test_killed_by_a_signal_is_nonzero_exit_naming_it() -> None:
    j = judge(replace(CLEAN, exit_code=128 + 15))
    assert (j.verdict, j.signal) == ("nonzero_exit", 15)
    assert j.message == "killed by SIGTERM"


def test_memory_kill_is_out_of_memory_with_the_limit() -> None:
    j = judge(replace(CLEAN, exit_code=137, oom_kills=1))
    assert (j.verdict, j.exit_code, j.signal) == ("out_of_memory", 137, 9)
    assert j.message == "out of memory (limit 64 MiB)"


def test_memory_kill_explains_a_timeout_that_follows() -> None:
    j = judge(replace(CLEAN, exit_code=137, oom_kills=1, timed_out=True))
    assert j.verdict == "out_of_memory"


def test_oom_of_a_child_that_the_command_survived_is_not_a_failure() -> None:
    assert judge(replace(CLEAN, exit_code=0, oom_kills=1)).verdict == "ok"


def test_full_process_table_is_pids_exhausted() -> None:
    j = judge(replace(CLEAN, exit_code=1, pids_max_events=5))
    assert j.verdict == "pids_exhausted"
    assert j.message == "process limit (32) reached"


def test_pids_events_with_a_clean_exit_stay_ok() -> None:
    assert judge(replace(CLEAN, pids_max_events=3)).verdict == "ok"


def test_timeout_wins_over_exit_code() -> None:
    j = judge(replace(CLEAN, exit_code=137, timed_out=True))
    assert j.verdict == "timed_out"
    assert j.message == "timed out after 2.0s"


def test_output_truncated_names_the_cap() -> None:
    j = judge(replace(CLEAN, exit_code=137, output_truncated=True, output_limit=1 * MiB))
    assert j.verdict == "output_truncated"
    assert "output truncated at 1 MiB" in j.message


def test_dead_container_is_crashed() -> None:
    j = judge(replace(CLEAN, exit_code=137, container_alive=False))
    assert j.verdict == "crashed"
    assert j.message == "sandbox crashed: signal SIGKILL"


def test_unknown_exit_code_is_crashed() -> None:
    j = judge(replace(CLEAN, exit_code=None))
    assert (j.verdict, j.exit_code) == ("crashed", -1)
    assert j.message == "sandbox crashed: exit code -1"


@pytest.mark.parametrize(("number", "name"), [(9, "SIGKILL"), (15, "SIGTERM"), (99, "signal 99")])
def test_signal_name(number: int, name: str) -> None:
    assert signal_name(number) == name


def test_every_proto_verdict_has_exactly_one_table_entry_and_back() -> None:
    """A verdict missing on either side fails here, not as INTERNAL in a call."""
    wire = {n: v for n, v in pb.Verdict.items() if v != pb.VERDICT_UNSPECIFIED}
    table = {info.wire: info for info in VERDICTS.values()}
    assert len(table) == len(VERDICTS), "two table entries share a proto number"
    assert set(table) == set(wire.values())
    for proto_name, number in wire.items():
        assert proto_name == f"VERDICT_{table[number].name.upper()}"
        assert by_wire(number) is table[number]
    assert by_wire(pb.VERDICT_UNSPECIFIED) is None


def test_table_keys_are_the_literal_and_stopped_verdicts_are_the_unfinished_ones() -> None:
    assert set(VERDICTS) == set(_literal_members(Verdict))
    assert all(name == info.name for name, info in VERDICTS.items())
    unfinished = {name for name, info in VERDICTS.items() if not info.finished}
    assert unfinished == set(get_args(StoppedVerdict))


def _literal_members(alias: object) -> list[str]:
    """Members of a Literal alias, nested Literals flattened."""
    out: list[str] = []
    for arg in get_args(alias):
        out.extend(_literal_members(arg) if get_args(arg) else [arg])
    return out


def test_cli_exit_codes_follow_the_shell_conventions() -> None:
    exits = {name: info.cli_exit for name, info in VERDICTS.items()}
    assert exits["timed_out"] == 124  # what timeout(1) exits with
    assert exits["out_of_memory"] == 137  # 128 + SIGKILL
    assert exits["ok"] is None and exits["nonzero_exit"] is None


def test_limit_kills() -> None:
    kills = {name for name, info in VERDICTS.items() if info.limit_kill}
    assert kills == {"timed_out", "out_of_memory", "pids_exhausted", "output_truncated"}


def test_every_sentence_can_be_made_from_facts_alone() -> None:
    facts = Facts(exit_code=1, memory_limit=64 * MiB, pids_limit=8, timeout_seconds=1.0)
    for info in VERDICTS.values():
        assert info.sentence(facts)
