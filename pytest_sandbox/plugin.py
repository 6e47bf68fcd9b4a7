"""pytest --sandbox: options, ini keys, the marker, and the one stateful object.

Module-level hooks only parse settings and route items; the Controller,
registered under a StashKey, does the work (the shape of pytest's junitxml).
Without --sandbox the plugin is inert, except that ini `sandbox_required`
makes running a marked test locally a usage error.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from pytest_sandbox.spec import ISOLATIONS, SCOPES, marker_kwargs, resolve, session_defaults

if TYPE_CHECKING:
    # The controller pulls in grpc and the client (~0.25 s): only sessions that route
    # tests pay for that import, not every pytest run on a machine with the plugin.
    from pytest_sandbox.controller import Controller, Options

controller_key: pytest.StashKey[Controller] = pytest.StashKey()

MARKER = (
    "sandbox(image=None, dockerfile=None, cpus=1.0, memory='512m', pids=256, timeout=60.0, "
    "network=False, scope='test', env=None, runtime=None, profile=None, isolation=None, "
    "mounts=None): "
    "with --sandbox, run this test in a fresh resource-limited container"
)


#: (name after `sandbox_`, help, type, default) of every ini key.
INI_KEYS: tuple[tuple[str, str, str, object], ...] = (
    ("image", "base image for sandboxes (default: the service's)", "string", ""),
    ("scope", "default sandbox scope: test, module or session", "string", "test"),
    ("dockerfile", "Dockerfile lines applied on top of the base image", "string", ""),
    ("cpus", "default CPU limit", "string", "1.0"),
    ("memory", "default memory limit (e.g. 512m)", "string", "512m"),
    ("pids", "default process limit", "string", "256"),
    ("timeout", "default per-test timeout in seconds", "string", "60"),
    ("address", "sandboxd address (default: the per-user local daemon)", "string", ""),
    ("embedded", "without an address, a sandboxd in the session, not the daemon", "bool", False),
    ("jobs", "sandboxes at once (default: number of CPUs)", "string", ""),
    ("required", "fail when a marked test would run locally", "bool", False),
    ("profile", "security profile: default or untrusted", "string", ""),
    ("isolation", "how scope=test starts pristine: fork or container", "string", ""),
    ("recycle", "with isolation=fork, tests per container before a fresh one", "string", ""),
    ("requirements", "requirements file for the sandbox's environment", "string", ""),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "running tests in sandboxes")
    # Two flags, not one option with an optional value: `nargs="?"` would swallow the
    # path in `pytest --sandbox tests/`. argparse matches `--sandbox=all` as a whole
    # option string before it splits at "=", so that spelling keeps working.
    group.addoption(
        "--sandbox",
        action="store_const",
        const="marked",
        default=None,
        dest="sandbox",
        help="run tests marked `sandbox` in sandboxes",
    )
    group.addoption(
        "--sandbox=all",
        action="store_const",
        const="all",
        default=None,
        dest="sandbox",
        help="run every collected test in a sandbox",
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
        help="use this sandboxd instead of the per-user local daemon (started when needed)",
    )
    group.addoption(
        "--sandbox-embedded",
        action="store_true",
        default=False,
        help="run a sandboxd inside this session instead of using the local daemon",
    )
    group.addoption(
        "--sandbox-jobs", type=int, default=None, metavar="N", help="run up to N sandboxes at once"
    )
    group.addoption(
        "--sandbox-isolation",
        choices=ISOLATIONS,
        default=None,
        help="how scope=test starts pristine: fork (a recycled container, reset and "
        "verified between tests) or container (a new container per test)",
    )
    group.addoption(
        "--sandbox-keep-failed",
        action="store_true",
        default=False,
        help="keep the sandbox of a failed test and print how to enter it",
    )
    for name, help_text, kind, default in INI_KEYS:
        parser.addini(f"sandbox_{name}", help_text, type=kind, default=default)  # type: ignore[arg-type]


def _options(config: pytest.Config, mode: str) -> Options:
    from pytest_sandbox import debugging
    from pytest_sandbox.controller import Options
    from sandboxd.daemon import embedded_by_default

    jobs = config.getoption("sandbox_jobs") or int(str(config.getini("sandbox_jobs")) or 0)
    return Options(
        mode=mode,
        address=config.getoption("sandbox_address")
        or str(config.getini("sandbox_address"))
        or None,
        jobs=jobs or os.cpu_count() or 1,
        keep_failed=bool(config.getoption("sandbox_keep_failed")),
        debug=debugging.terminal_available(config),
        embedded=bool(config.getoption("sandbox_embedded") or config.getini("sandbox_embedded"))
        or embedded_by_default(),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    mode = config.getoption("sandbox")
    if mode is None or hasattr(config, "workerinput"):  # xdist workers never route
        return
    from pytest_sandbox.controller import Controller

    controller = Controller(config, _options(config, mode))
    config.stash[controller_key] = controller
    config.pluginmanager.register(controller, "sandbox-controller")
    controller.start()


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
    defaults = session_defaults(config)
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
    from sandboxd.daemon import default_paths

    opts = controller.options
    if opts.address:
        where = f"sandboxd at {opts.address}"
    elif opts.embedded:
        where = "a sandboxd embedded in this session"
    else:
        where = f"the local sandboxd daemon ({default_paths().address})"
    routed = "every test" if opts.mode == "all" else "tests marked sandbox"
    defaults = session_defaults(config)
    forced = controller.forced_isolation()
    isolation = defaults.isolation if forced is None else f"container ({forced})"
    return (
        f"sandbox: {routed} via {where}, up to {opts.jobs} at once; "
        f"scope {defaults.scope}, isolation {isolation}"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    controller = terminalreporter.config.stash.get(controller_key, None)
    if controller is None:
        return
    controller.report_build_failures(terminalreporter)
    if not controller.kept:
        return
    terminalreporter.section("sandboxes kept for inspection")
    for line in controller.summary_lines():
        terminalreporter.line(line)
