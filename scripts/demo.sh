#!/usr/bin/env bash
# The main job: prepares the host, then runs the demo project's tests in sandboxes with
# `pytest --sandbox`. Extra arguments go to pytest (default: -rA, a line per test).
# Exits with pytest's exit code; stops the local sandboxd daemon if it started it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/host-setup.sh"

VENV="${SANDBOX_VENV:-$ROOT/.venv}"
DEMO="$ROOT/examples/demo"
[ -d "$DEMO" ] || { echo "demo project $DEMO is missing" >&2; exit 2; }
cd "$DEMO"
if [ "$#" -eq 0 ]; then
    set -- -rA
fi
# The tests run in the per-user local daemon, as a developer's would (its image cache
# and warm pool outlive the session). A daemon this script started is stopped on the way
# out, so the job leaves nothing running; one that was already running is left alone.
SANDBOXD=("$VENV/bin/python" -m sandboxd.cli)
if ! "${SANDBOXD[@]}" daemon status >/dev/null 2>&1; then
    trap '"${SANDBOXD[@]}" daemon stop >/dev/null || true' EXIT
fi
status=0
"$VENV/bin/python" -m pytest --sandbox "$@" || status=$?
exit "$status"
