"""pytest --sandbox: options, ini keys, the marker, and the one stateful object.

Module-level hooks only parse settings and route items; the Controller,
registered under a StashKey, does the work (the shape of pytest's junitxml).
Without --sandbox the plugin is inert, except that ini `sandbox_required`
makes running a marked test locally a usage error.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.controller import Controller, Options, default_jobs
from pytest_sandbox.spec import SCOPES, Defaults, marker_kwargs, parse_memory, resolve

controller_key = pytest.StashKey[Controller]()

MARKER = (
    "sandbox(image=None, dockerfile=None, cpus=1.0, memory='512m', pids=256, timeout=60.0, "
    "network=False, scope='test', env=None, runtime=None, profile=None): "
    "with --sandbox, run this test in a fresh resource-limited container"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "running tests in sandboxes")
    group.addoption(
        "--sandbox",
        nargs="?",
        const="marked",
        default=None,
        metavar="all",
        help="run tests marked `sandbox` in sandboxes; --sandbox=all routes every test",
    )
    group.addoption(
        "--sandbox-scope",
        choices=SCOPES,
        default=None,
        help="default sandbox scope: a fresh container per test, module or session",
    )
    group.addoption(
        "--sandbox-address",
        default=None,
        metavar="HOST:PORT|unix:PATH",
        help="use a running sandboxd instead of an embedded one",
    )
    group.addoption(
        "--sandbox-jobs", type=int, default=None, metavar="N", help="run up to N sandboxes at once"
    )
    group.addoption(
        "--sandbox-keep-failed",
        action="store_true",
        default=False,
        help="keep the sandbox of a failed test and print how to enter it",
    )
    for name, help_text, kind, default in (
        ("image", "base image for sandboxes (default: the service's)", "string", ""),
        ("scope", "default sandbox scope: test, module or session", "string", "test"),
        ("dockerfile", "Dockerfile lines applied on top of the base image", "string", ""),
        ("cpus", "default CPU limit", "string", "1.0"),
        ("memory", "default memory limit (e.g. 512m)", "string", "512m"),
        ("pids", "default process limit", "string", "256"),
        ("timeout", "default per-test timeout in seconds", "string", "60"),
        ("address", "sandboxd address (default: an embedded one)", "string", ""),
        ("jobs", "sandboxes at once (default: number of CPUs)", "string", ""),
        ("required", "fail when a marked test would run locally", "bool", False),
    ):
        parser.addini(f"sandbox_{name}", help_text, type=kind, default=default)  # type: ignore[arg-type]


def _defaults(config: pytest.Config) -> Defaults:
    def ini(name: str) -> str:
        return str(config.getini(f"sandbox_{name}")).strip()

    scope = config.getoption("sandbox_scope") or ini("scope") or "test"
    if scope not in SCOPES:
        raise pytest.UsageError(f"sandbox_scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    try:
        return Defaults(
            image=ini("image"),
            dockerfile=ini("dockerfile"),
            cpus=float(ini("cpus") or 1.0),
            memory=parse_memory(ini("memory") or "512m"),
            pids=int(ini("pids") or 256),
            timeout=float(ini("timeout") or 60.0),
            scope=scope,
        )
    except ValueError as exc:
        raise pytest.UsageError(f"sandbox ini settings: {exc}") from None


def _options(config: pytest.Config, mode: str) -> Options:
    if mode not in ("marked", "all"):
        raise pytest.UsageError(f"--sandbox takes no value or `all`, not {mode!r}")
    jobs = config.getoption("sandbox_jobs") or int(str(config.getini("sandbox_jobs")) or 0)
    return Options(
        mode=mode,
        address=config.getoption("sandbox_address")
        or str(config.getini("sandbox_address"))
        or None,
        jobs=jobs or default_jobs(),
        keep_failed=bool(config.getoption("sandbox_keep_failed")),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    mode = config.getoption("sandbox")
    if mode is None or hasattr(config, "workerinput"):  # xdist workers never route
        return
    controller = Controller(config, _options(config, mode))
    config.stash[controller_key] = controller
    config.pluginmanager.register(controller, "sandbox-controller")


def pytest_unconfigure(config: pytest.Config) -> None:
    controller = config.stash.get(controller_key, None)
    if controller is not None:
        controller.close()
        del config.stash[controller_key]
        config.pluginmanager.unregister(controller)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    controller = config.stash.get(controller_key, None)
    if controller is None:
        if config.getini("sandbox_required"):
            marked = [it.nodeid for it in items if it.get_closest_marker("sandbox")]
            if marked:
                raise pytest.UsageError(
                    "sandbox_required is set but --sandbox was not given; these tests would "
                    f"run outside a sandbox: {', '.join(marked[:5])}"
                    + (f" and {len(marked) - 5} more" if len(marked) > 5 else "")
                )
        return
    defaults = _defaults(config)
    route_all = controller.options.mode == "all"
    for item in items:
        kwargs = marker_kwargs(item)
        if kwargs is None and not route_all:
            continue
        try:
            controller.specs[item.nodeid] = resolve(kwargs or {}, defaults)
        except ValueError as exc:
            raise pytest.UsageError(f"{item.nodeid}: bad sandbox marker: {exc}") from None


def pytest_report_header(config: pytest.Config) -> str | None:
    controller = config.stash.get(controller_key, None)
    if controller is None:
        return None
    opts = controller.options
    where = opts.address or "embedded sandboxd"
    routed = "every test" if opts.mode == "all" else "tests marked sandbox"
    return f"sandbox: {routed} via {where}, up to {opts.jobs} at once"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    controller = terminalreporter.config.stash.get(controller_key, None)
    if controller is None or not controller.kept:
        return
    terminalreporter.section("sandboxes kept for inspection")
    for line in controller.summary_lines():
        terminalreporter.line(line)
