"""Resource limits: parsing sizes, defaults, and the server-side caps no client can raise."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from sandboxd.errors import InvalidArgument, invalid_fields

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(value: str | int | float, *, field: str = "size") -> int:
    """Parse `512m`, `1g`, `64MiB` or a plain byte count into bytes.

    Raises:
        InvalidArgument: the value is not a non-negative size.
    """
    if isinstance(value, bool):
        raise InvalidArgument(f"{field}: expected a size such as 512m, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"{field}: must be a non-negative size, got {value!r}")
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise InvalidArgument(f"{field}: expected a size such as 512m or 1g, got {value!r}")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_size(n: int) -> str:
    """Human form used in messages: `64 MiB`, `1.5 GiB`, `512 KiB`."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Limits:
    """Limits applied to one sandbox. Zero in a request means "server default"."""

    cpus: float = 1.0
    memory_bytes: int = 512 * MiB
    pids: int = 256
    scratch_bytes: int = 256 * MiB
    network: bool = False
    timeout_seconds: float = 60.0
    output_bytes: int = 16 * MiB


@dataclass(frozen=True)
class Caps:
    """Server-side maxima. A request above any of them is refused, never lowered."""

    cpus: float = 4.0
    memory_bytes: int = 8 * GiB
    pids: int = 4096
    scratch_bytes: int = 4 * GiB
    network: bool = False
    timeout_seconds: float = 3600.0
    output_bytes: int = 256 * MiB
    ttl_seconds: float = 6 * 3600.0
    sandboxes: int = 64


# Below these a sandbox cannot even start a shell; refusing early gives a clearer error.
MIN_MEMORY = 6 * MiB
MIN_PIDS = 2
MIN_SCRATCH = 1 * MiB


def _check_number(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"{field}: must be a finite number, got {value!r}")
    if value < 0:
        raise InvalidArgument(f"{field}: must not be negative, got {value!r}")


def resolve(requested: Limits | None, defaults: Limits, caps: Caps) -> Limits:
    """Fill zeros from `defaults` and check every field against `caps`.

    Raises:
        InvalidArgument: a field is negative or not finite; or fields too small or above
            their caps (every one of them, each a field violation).
    """
    if requested is None:
        requested = Limits(0, 0, 0, 0, False, 0, 0)
    for field in (
        "cpus",
        "memory_bytes",
        "pids",
        "scratch_bytes",
        "timeout_seconds",
        "output_bytes",
    ):
        _check_number(f"limits.{field}", getattr(requested, field))
    out = replace(
        defaults,
        cpus=requested.cpus or defaults.cpus,
        memory_bytes=requested.memory_bytes or defaults.memory_bytes,
        pids=requested.pids or defaults.pids,
        scratch_bytes=requested.scratch_bytes or defaults.scratch_bytes,
        network=requested.network,
        timeout_seconds=requested.timeout_seconds or defaults.timeout_seconds,
        output_bytes=requested.output_bytes or defaults.output_bytes,
    )
    over = [
        ("cpus", out.cpus, caps.cpus, str(caps.cpus)),
        ("memory_bytes", out.memory_bytes, caps.memory_bytes, format_size(caps.memory_bytes)),
        ("pids", out.pids, caps.pids, str(caps.pids)),
        ("scratch_bytes", out.scratch_bytes, caps.scratch_bytes, format_size(caps.scratch_bytes)),
        (
            "timeout_seconds",
            out.timeout_seconds,
            caps.timeout_seconds,
            f"{caps.timeout_seconds:g}s",
        ),
        ("output_bytes", out.output_bytes, caps.output_bytes, format_size(caps.output_bytes)),
    ]
    problems: list[str] = []
    for field, value, cap, shown in over:
        if value > cap:
            # Integers as sent (a client compares them with its request); `:g` would turn
            # 8589934593 into 8.58993e+09.
            sent = str(value) if isinstance(value, int) else f"{value:g}"
            problems.append(f"limits.{field}: {sent} is above the server's cap of {shown}")
    if out.network and not caps.network:
        problems.append("limits.network: this server does not allow network access")
    if out.cpus < 0.01:
        problems.append(f"limits.cpus: {out.cpus:g} is below the minimum of 0.01")
    if out.memory_bytes < MIN_MEMORY:
        problems.append(
            f"limits.memory_bytes: {format_size(out.memory_bytes)} is below the minimum of "
            f"{format_size(MIN_MEMORY)}"
        )
    if out.pids < MIN_PIDS:
        problems.append(f"limits.pids: {out.pids} is below the minimum of {MIN_PIDS}")
    if out.scratch_bytes < MIN_SCRATCH:
        problems.append(
            f"limits.scratch_bytes: {format_size(out.scratch_bytes)} is below the minimum of "
            f"{format_size(MIN_SCRATCH)}"
        )
    if problems:
        raise invalid_fields(problems)
    return out


def check_ttl(ttl: float, default: float, caps: Caps) -> float:
    """Resolve a sandbox time-to-live.

    Raises:
        InvalidArgument: negative, not finite or above the cap.
    """
    _check_number("spec.ttl_seconds", ttl)
    ttl = ttl or default
    if ttl > caps.ttl_seconds:
        raise InvalidArgument(
            f"spec.ttl_seconds: {ttl:g} is above the server's cap of {caps.ttl_seconds:g}s"
        )
    return ttl
