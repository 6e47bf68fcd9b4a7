#!/usr/bin/env bash
# Idempotent host preparation: Docker engine (with the gVisor runtime registered),
# the project's virtualenv and the offline base image. Safe to run repeatedly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SANDBOX_VENV:-$ROOT/.venv}"
BASE_IMAGE="${SANDBOX_BASE_IMAGE:-sandbox-base:bookworm}"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[host-setup] %s\n' "$*" >&2; }

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
command -v runsc >/dev/null 2>&1 || need_pkgs+=(runsc)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# Register gVisor (ptrace platform, no network) as runtime "runsc".
if command -v runsc >/dev/null 2>&1; then
    mkdir -p /etc/docker
    want='{"runtimes": {"runsc": {"path": "'"$(command -v runsc)"'", "runtimeArgs": ["--network=none", "--platform=ptrace"]}}}'
    if [ ! -f /etc/docker/daemon.json ] || ! grep -q '"runsc"' /etc/docker/daemon.json; then
        log "registering runsc in /etc/docker/daemon.json"
        printf '%s\n' "$want" > /etc/docker/daemon.json
        if engine_answers && [ -f /var/run/docker.pid ]; then
            kill -HUP "$(cat /var/run/docker.pid)" || true
            sleep 1
        fi
    fi
fi

if ! engine_answers; then
    log "starting dockerd"
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl start docker || true
    fi
    if ! engine_answers; then
        rm -f /var/run/docker.pid
        nohup dockerd >/var/log/sandbox-dockerd.log 2>&1 &
    fi
    for _ in $(seq 1 60); do
        engine_answers && break
        sleep 1
    done
    engine_answers || { log "dockerd did not come up; see /var/log/sandbox-dockerd.log"; tail -20 /var/log/sandbox-dockerd.log >&2; exit 1; }
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    log "installing the project into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e "$ROOT[dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "making base image $BASE_IMAGE offline (debootstrap)"
    "$VENV/bin/sandboxd" bootstrap-image --tag "$BASE_IMAGE"
fi
log "ready: engine up, venv $VENV, base image $BASE_IMAGE"
