from __future__ import annotations

import math

import pytest

from sandboxd.errors import InvalidArgument
from sandboxd.limits import (
    Caps,
    GiB,
    Limits,
    MiB,
    check_ttl,
    format_size,
    parse_size,
    resolve,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512m", 512 * MiB),
        ("1g", GiB),
        ("64MiB", 64 * MiB),
        ("64MB", 64 * MiB),
        ("2k", 2048),
        ("1.5g", int(1.5 * GiB)),
        (" 100 ", 100),
        ("0", 0),
        (4096, 4096),
        (1.5, 1),
    ],
)
def test_parse_size_accepts_common_forms(text: str | int | float, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "m", "-1m", "12x", "1..2g", "ten", -5, math.inf, math.nan, True]
)
def test_parse_size_refuses_non_sizes_naming_the_field(bad: object) -> None:
    with pytest.raises(InvalidArgument, match=r"--memory"):
        parse_size(bad, field="--memory")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [(64 * MiB, "64 MiB"), (int(1.5 * GiB), "1.5 GiB"), (512 * 1024, "512 KiB"), (10, "10 B")],
)
def test_format_size_is_human(n: int, text: str) -> None:
    assert format_size(n) == text


def test_resolve_fills_zeros_from_defaults() -> None:
    defaults = Limits(cpus=0.5, memory_bytes=128 * MiB, pids=64, timeout_seconds=10.0)
    out = resolve(Limits(0, 0, 0, 0, False, 0, 0), defaults, Caps())
    assert out == defaults


def test_resolve_without_request_is_the_defaults() -> None:
    assert resolve(None, Limits(), Caps()) == Limits()


def test_resolve_keeps_values_within_caps() -> None:
    asked = Limits(cpus=2.0, memory_bytes=1 * GiB, pids=100, timeout_seconds=5.0)
    assert resolve(asked, Limits(), Caps()) == asked


@pytest.mark.parametrize(
    ("asked", "field", "cap"),
    [
        (Limits(cpus=8.0), "limits.cpus", "4.0"),
        (Limits(memory_bytes=16 * GiB), "limits.memory_bytes", "8 GiB"),
        (Limits(pids=100_000), "limits.pids", "4096"),
        (Limits(scratch_bytes=8 * GiB), "limits.scratch_bytes", "4 GiB"),
        (Limits(timeout_seconds=7200.0), "limits.timeout_seconds", "3600s"),
        (Limits(output_bytes=1 * GiB), "limits.output_bytes", "256 MiB"),
    ],
)
def test_resolve_refuses_above_cap_naming_field_and_cap(
    asked: Limits, field: str, cap: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve(asked, Limits(), Caps())
    assert field in info.value.message
    assert f"cap of {cap}" in info.value.message


def test_resolve_never_lowers_a_request_to_the_cap() -> None:
    caps = Caps(memory_bytes=256 * MiB)
    with pytest.raises(InvalidArgument, match=r"limits.memory_bytes"):
        resolve(Limits(memory_bytes=257 * MiB), Limits(memory_bytes=128 * MiB), caps)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpus", -1.0),
        ("memory_bytes", -1),
        ("pids", -5),
        ("scratch_bytes", -1),
        ("timeout_seconds", -0.5),
        ("output_bytes", -1),
    ],
)
def test_resolve_refuses_negative_values(field: str, value: float) -> None:
    asked = Limits(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=rf"limits.{field}: must not be negative"):
        resolve(asked, Limits(), Caps())


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_resolve_refuses_non_finite(value: float) -> None:
    with pytest.raises(InvalidArgument, match=r"limits.cpus: must be a finite number"):
        resolve(Limits(cpus=value), Limits(), Caps())


@pytest.mark.parametrize(
    ("asked", "field"),
    [
        (Limits(cpus=0.001), "limits.cpus"),
        (Limits(memory_bytes=1 * MiB), "limits.memory_bytes"),
        (Limits(pids=1), "limits.pids"),
        (Limits(scratch_bytes=1024), "limits.scratch_bytes"),
    ],
)
def test_resolve_refuses_below_minimum(asked: Limits, field: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"{field}: .* below the minimum"):
        resolve(asked, Limits(), Caps())


def test_network_needs_the_cap_to_allow_it() -> None:
    with pytest.raises(InvalidArgument, match=r"limits.network"):
        resolve(Limits(network=True), Limits(), Caps(network=False))
    assert resolve(Limits(network=True), Limits(), Caps(network=True)).network


def test_check_ttl_defaults_and_caps() -> None:
    caps = Caps(ttl_seconds=100.0)
    assert check_ttl(0.0, 50.0, caps) == 50.0
    assert check_ttl(10.0, 50.0, caps) == 10.0
    with pytest.raises(
        InvalidArgument, match=r"spec.ttl_seconds: 101 is above the server's cap of 100s"
    ):
        check_ttl(101.0, 50.0, caps)
    with pytest.raises(InvalidArgument, match=r"spec.ttl_seconds: must not be negative"):
        check_ttl(-1.0, 50.0, caps)


def test_every_bad_field_is_reported_at_once_each_as_a_violation() -> None:
    asked = Limits(cpus=64.0, memory_bytes=1024, pids=1_000_000, network=True)
    with pytest.raises(InvalidArgument) as info:
        resolve(asked, Limits(), Caps(network=False))
    fields = [v.field for v in info.value.violations]
    assert fields == ["limits.cpus", "limits.pids", "limits.network", "limits.memory_bytes"]
    assert "above the server's cap" in info.value.violations[0].description
    assert "below the minimum" in info.value.violations[3].description
    assert all(v.description in info.value.message for v in info.value.violations)
