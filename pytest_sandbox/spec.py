"""What a routed test asks for: the resolved marker, ini and command-line settings."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from sandboxd.api import Mount
from sandboxd.errors import InvalidArgument
from sandboxd.limits import format_size, parse_size

Scope = Literal["test", "module", "session"]
SCOPES: tuple[Scope, ...] = ("test", "module", "session")
#: How scope=test is made pristine: a recycled container reset between tests, or a new one.
Isolation = Literal["fork", "container"]
ISOLATIONS: tuple[Isolation, ...] = ("fork", "container")
DEFAULT_ISOLATION: Isolation = "fork"
#: The profile for untrusted code always gets a brand-new container per test.
CONTAINER_ONLY_PROFILES = frozenset({"untrusted"})

MARKER_KWARGS = (
    "image",
    "dockerfile",
    "cpus",
    "memory",
    "pids",
    "timeout",
    "network",
    "scope",
    "env",
    "runtime",
    "profile",
    "isolation",
    "mounts",
)


def _memory(value: object) -> int:
    """Bytes for `512m`, `64MiB`, `1g` or a plain integer: the service's own size syntax.

    Raises:
        ValueError: the value is not a size (as every other bad marker value).
    """
    try:
        return parse_size(value if isinstance(value, (int, float)) else str(value), field="memory")
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class Defaults:
    """Session-wide defaults from ini keys and options; the marker overrides them."""

    image: str = ""
    dockerfile: str = ""
    cpus: float = 1.0
    memory: int = 512 * 1024 * 1024
    pids: int = 256
    timeout: float = 60.0
    scope: Scope = "test"
    profile: str = ""
    isolation: Isolation = DEFAULT_ISOLATION


@dataclass(frozen=True)
class RouteSpec:
    """Everything that decides which image a test runs in and with what limits.

    Frozen and hashable: tests with equal specs (and scope key) share a sandbox.
    """

    image: str = ""
    dockerfile: str = ""
    cpus: float = 1.0
    memory: int = 512 * 1024 * 1024
    pids: int = 256
    timeout: float = 60.0
    network: bool = False
    scope: Scope = "test"
    env: tuple[tuple[str, str], ...] = field(default=())
    runtime: str = ""
    profile: str = ""
    isolation: Isolation = "container"
    #: Host directories the server mounts in (read-only unless asked and allowed).
    mounts: tuple[Mount, ...] = ()

    @property
    def forks(self) -> bool:
        """Its tests run one fork each in a recycled container (scope=test only)."""
        return self.scope == "test" and self.isolation == "fork"

    @property
    def build_key(self) -> tuple[str, str]:
        """Specs with equal build keys share one image."""
        return (self.image, self.dockerfile)

    def properties(self) -> list[tuple[str, object]]:
        return [
            ("sandbox_cpus", self.cpus),
            ("sandbox_memory", format_size(self.memory)),
            ("sandbox_pids", self.pids),
            ("sandbox_timeout", self.timeout),
            ("sandbox_network", self.network),
            ("sandbox_scope", self.scope),
            ("sandbox_isolation", self.isolation),
        ]


def _scope(value: object) -> Scope:
    if value not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {value!r}")
    return value


def _isolation(value: object, profile: str, mounts: tuple[Mount, ...] = ()) -> Isolation:
    """The isolation asked for, or "container" where a fork could not be made pristine: for
    the untrusted profile, and with a writable host mount, whose new files are the test's
    output on the host, which the reset between forked tests would remove."""
    if value not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, not {value!r}")
    if profile in CONTAINER_ONLY_PROFILES or any(m.writable for m in mounts):
        return "container"
    return value


def _env(value: object, host_env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A dict sets values; a list of names forwards those host variables (if set)."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), str(v)) for k, v in value.items()))
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Iterable):
        names = [str(n) for n in value]
        return tuple(sorted((n, host_env[n]) for n in names if n in host_env))
    raise ValueError(f"env must be a dict or a list of variable names, not {value!r}")


def _mounts(value: object) -> tuple[Mount, ...]:
    """`"/host/dir"`, `"/host/dir:/in/sandbox"`, `"/host/dir:/in/sandbox:rw"` (Docker's -v
    form), or `Mount` objects; one or a list of them.

    Raises:
        ValueError: an item of another form.
    """
    if value is None:
        return ()
    items = [value] if isinstance(value, (str, Mount)) else value
    if not isinstance(items, Iterable):
        raise ValueError(f"mounts must be a list of paths or Mount objects, not {value!r}")
    mounts: list[Mount] = []
    for item in items:
        if isinstance(item, Mount):
            mounts.append(item)
            continue
        if not isinstance(item, str):
            raise ValueError(f"mounts: {item!r} is not a path or a Mount")
        parts = item.split(":")
        mode = parts.pop() if len(parts) == 3 else "ro"
        if len(parts) > 2 or mode not in ("ro", "rw") or not parts[0]:
            raise ValueError(f"mounts: {item!r} is not SOURCE[:TARGET[:ro|rw]]")
        target = parts[1] if len(parts) == 2 else ""
        mounts.append(Mount(parts[0], target, writable=mode == "rw"))
    return tuple(mounts)


def marker_kwargs(item: pytest.Item) -> dict[str, Any] | None:
    """The merged kwargs of the item's sandbox markers (closest wins), None if unmarked.

    Raises:
        pytest.UsageError: a marker has positional or unknown arguments.
    """
    markers = list(item.iter_markers("sandbox"))
    if not markers:
        return None
    merged: dict[str, Any] = {}
    for mark in reversed(markers):  # iter_markers yields closest first
        if mark.args:
            raise pytest.UsageError(
                f"{item.nodeid}: sandbox marker takes keyword arguments only, got {mark.args!r}"
            )
        unknown = set(mark.kwargs) - set(MARKER_KWARGS)
        if unknown:
            raise pytest.UsageError(
                f"{item.nodeid}: unknown sandbox marker argument(s): {', '.join(sorted(unknown))}"
            )
        merged.update(mark.kwargs)
    return merged


def resolve(
    kwargs: Mapping[str, Any], defaults: Defaults, host_env: Mapping[str, str] | None = None
) -> RouteSpec:
    """Marker kwargs over session defaults.

    Raises:
        ValueError: a value has the wrong type or is out of range.
    """
    host_env = os.environ if host_env is None else host_env

    def get(name: str, default: Any) -> Any:
        value = kwargs.get(name)
        return default if value is None else value

    cpus = float(get("cpus", defaults.cpus))
    pids = int(get("pids", defaults.pids))
    timeout = float(get("timeout", defaults.timeout))
    if cpus <= 0 or pids <= 0 or timeout <= 0:
        raise ValueError("cpus, pids and timeout must be positive")
    profile = str(get("profile", defaults.profile))
    mounts = _mounts(kwargs.get("mounts"))
    return RouteSpec(
        image=str(get("image", defaults.image)),
        dockerfile=str(get("dockerfile", defaults.dockerfile)).strip(),
        cpus=cpus,
        memory=_memory(get("memory", defaults.memory)),
        pids=pids,
        timeout=timeout,
        network=bool(get("network", False)),
        scope=_scope(get("scope", defaults.scope)),
        env=_env(kwargs.get("env"), host_env),
        runtime=str(get("runtime", "")),
        profile=profile,
        isolation=_isolation(get("isolation", defaults.isolation), profile, mounts),
        mounts=mounts,
    )


def session_defaults(config: pytest.Config) -> Defaults:
    """The session's defaults from --sandbox-scope and the ini keys.

    Raises:
        pytest.UsageError: a bad scope or ini value.
    """

    def ini(name: str) -> str:
        return str(config.getini(f"sandbox_{name}")).strip()

    scope = config.getoption("sandbox_scope") or ini("scope") or "test"
    if scope not in SCOPES:
        raise pytest.UsageError(f"sandbox_scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    isolation = config.getoption("sandbox_isolation") or ini("isolation") or DEFAULT_ISOLATION
    if isolation not in ISOLATIONS:
        raise pytest.UsageError(
            f"sandbox_isolation must be one of {', '.join(ISOLATIONS)}, not {isolation!r}"
        )
    try:
        return Defaults(
            image=ini("image"),
            dockerfile=ini("dockerfile"),
            cpus=float(ini("cpus") or 1.0),
            memory=_memory(ini("memory") or "512m"),
            pids=int(ini("pids") or 256),
            timeout=float(ini("timeout") or 60.0),
            scope=scope,
            profile=ini("profile"),
            isolation=isolation,
        )
    except ValueError as exc:
        raise pytest.UsageError(f"sandbox ini settings: {exc}") from None
