#!/usr/bin/env bash
# The project's test command: prepares the host (Docker engine, virtualenv, base image),
# then runs every check. All checks run even when one fails, so one CI run shows every
# problem; the exit code is pytest's when the tests failed, else the first failed check's.
# Extra arguments go to pytest (e.g. scripts/test.sh -k limits -x).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/host-setup.sh"

VENV="${SANDBOX_VENV:-$ROOT/.venv}"
# Docker and Podman are up at this point, so a test that would skip for want of an
# engine is a missing test: tests that honour this variable fail instead of skipping
# (tests/integration/test_engines.py runs against both engines and never skips).
export SANDBOX_REQUIRE_DOCKER=1

status=0
check() {
    local name=$1 rc=0
    shift
    printf '\n== %s\n' "$name" >&2
    "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        printf '== %s FAILED (exit %d)\n' "$name" "$rc" >&2
        [ "$status" -ne 0 ] || status=$rc
    fi
    return 0
}

check "generated stubs are fresh" "$VENV/bin/python" scripts/gen_protos.py --check
check "ruff" "$VENV/bin/ruff" check .
check "mypy" "$VENV/bin/mypy" sandboxd pytest_sandbox

printf '\n== pytest\n' >&2
tests_rc=0
"$VENV/bin/python" -m pytest tests -q --durations=10 "$@" || tests_rc=$?
if [ "$tests_rc" -ne 0 ]; then
    exit "$tests_rc"
fi
if [ "$status" -ne 0 ]; then
    printf '\ntests passed, but a check above failed\n' >&2
fi
exit "$status"
