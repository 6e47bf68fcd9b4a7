#!/usr/bin/env bash
# The main job: prepares the host, then runs the demo project's tests in sandboxes with
# `pytest --sandbox`. Extra arguments go to pytest (default: -rA, a line per test).
# Exits with pytest's exit code.
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
exec "$VENV/bin/python" -m pytest --sandbox "$@"
