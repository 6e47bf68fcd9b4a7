"""Which of the host's command-line options the worker's pytest gets.

Routing, selection and reporting (-k, -m, --lf, -r, --junitxml, ...) happen on
the host; the worker only needs what changes how a test runs or how its report
is rendered. Anything not listed here is dropped, so an option of a plugin that
does not exist inside the sandbox cannot break the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Flags without a value.
FLAGS = frozenset(
    {
        "-v",
        "--verbose",
        "-q",
        "--quiet",
        "-l",
        "--showlocals",
        "-s",
        "-x",
        "--exitfirst",
        "--runxfail",
        "--strict-markers",
        "--strict-config",
        "--strict",
        "--full-trace",
        "--doctest-modules",
        "--doctest-continue-on-failure",
        "--disable-warnings",
        "--disable-pytest-warnings",
    }
)
# Options that take a value (as `--opt=value` or `--opt value`).
VALUED = frozenset(
    {
        "--tb",
        "--capture",
        "-W",
        "--pythonwarnings",
        "-o",
        "--override-ini",
        "--import-mode",
        "--assert",
        "--maxfail",
        "--doctest-glob",
        "--doctest-report",
        "--log-level",
        "--log-format",
        "--log-date-format",
        "-p",
    }
)
SHORT_FLAGS = "vqlsx"


def worker_args(
    invocation: Sequence[str], *, plugin_ok: Callable[[str], bool] = lambda name: False
) -> list[str]:
    """The subset of `invocation` that is safe and meaningful inside the sandbox.

    `-p NAME` passes only when it disables a plugin or `plugin_ok(NAME)` says
    the plugin exists inside (pytest's own plugins do).
    """
    out: list[str] = []
    args = list(invocation)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if arg.startswith("--") and name in VALUED:
            if not eq:
                if i >= len(args):
                    break
                value = args[i]
                i += 1
            out += [name, value]
        elif arg.startswith("--") and arg in FLAGS:
            out.append(arg)
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) >= 2:
            opt, attached = arg[:2], arg[2:]
            if opt in VALUED:
                if not attached:
                    if i >= len(args):
                        break
                    attached = args[i]
                    i += 1
                if opt != "-p" or attached.startswith("no:") or plugin_ok(attached):
                    out += [opt, attached]
            elif all(c in SHORT_FLAGS for c in arg[1:]):
                out.append(arg)
            elif opt in ("-k", "-m", "-r", "-n", "-c") and not attached:
                i += 1  # host-side option with a separate value: skip the value too
    return out
