#!/usr/bin/env bash
# Idempotent host preparation for a Debian machine, run as root: the Docker engine
# (with gVisor registered as runtime "runsc"), the project's virtualenv, the offline
# base image, and Podman (the second engine: its API service and the base image in its
# store). Safe to run repeatedly; when everything is in place it takes a few seconds.
#
# Environment: SANDBOX_VENV (default ./.venv), SANDBOX_BASE_IMAGE (default
# sandbox-base:bookworm), SANDBOX_MIRROR (Debian mirror for the base image),
# DOCKERD_LOG (default /var/log/dockerd.log), SANDBOX_PODMAN (default 1; 0 leaves
# Podman alone), PODMAN_SOCKET (default /run/podman/podman.sock), PODMAN_LOG (default
# /var/log/podman-service.log), SANDBOX_BUILD_PROXY (default 1: the caching package
# proxy that builds under the `proxy` network policy reach; 0 leaves it alone).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SANDBOX_VENV:-$ROOT/.venv}"
BASE_IMAGE="${SANDBOX_BASE_IMAGE:-sandbox-base:bookworm}"
MIRROR="${SANDBOX_MIRROR:-http://deb.debian.org/debian}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
DAEMON_JSON=/etc/docker/daemon.json
WANT_PODMAN="${SANDBOX_PODMAN:-1}"
PODMAN_SOCKET="${PODMAN_SOCKET:-/run/podman/podman.sock}"
PODMAN_LOG="${PODMAN_LOG:-/var/log/podman-service.log}"
WANT_BUILD_PROXY="${SANDBOX_BUILD_PROXY:-1}"
# Names the server config's defaults expect (build_proxy, build_proxy_network).
BUILD_NETWORK=sandbox-build
BUILD_BRIDGE=sbx-build0
PROXY_NAME=sandbox-aptproxy
PROXY_IMAGE=sandbox-aptproxy:bookworm
export DEBIAN_FRONTEND=noninteractive

log() { printf '[host-setup] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages, starts dockerd and runs debootstrap)"

# Two runs at once (a demo and the suite, say) would race on apt, daemon.json and the
# image; the second one waits. fd 9 is closed for every long-lived child (dockerd) so
# the lock dies with this script.
mkdir -p /run/lock
exec 9>/run/lock/sandbox-host-setup.lock
flock 9

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

# -- packages ----------------------------------------------------------------------------
# debootstrap is installed without recommends, so its keyring and gpgv are named
# explicitly: without them it would download the base system unverified.
need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd python3 || need+=(python3)
have_cmd python3 && python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
have_cmd dockerd || need+=(docker.io)
have_cmd docker || need+=(docker.io)
have_cmd debootstrap || need+=(debootstrap)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
have_cmd gpgv || need+=(gpgv)
have_cmd runsc || need+=(runsc)
have_cmd ip || need+=(iproute2)
have_cmd flock || need+=(util-linux)
# The multi-node tests (tests/cluster) run a Docker engine per network namespace.
have_cmd nsenter || need+=(util-linux)
# The grading report's test renders it in a real browser.
have_cmd chromium || need+=(chromium)
if [ "$WANT_PODMAN" = 1 ]; then
    # Podman's --init (which the service asks for, as with Docker) is catatonit; runc
    # because Podman's default crun refuses this kind of host's hybrid cgroups.
    have_cmd podman || need+=(podman)
    have_cmd catatonit || need+=(catatonit)
    have_cmd runc || need+=(runc)
fi
if [ "${#need[@]}" -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    log "installing ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# -- gVisor runtime ----------------------------------------------------------------------
# Merge into daemon.json rather than overwrite it: other keys (mirrors, storage driver,
# log options) belong to whoever runs this machine. Prints "changed" when it wrote.
register_runsc() {
    python3 - "$DAEMON_JSON" "$(command -v runsc)" <<'PY'
import json, os, sys, tempfile

path, runsc = sys.argv[1], sys.argv[2]
want = {"path": runsc, "runtimeArgs": ["--network=none", "--platform=ptrace"]}
try:
    with open(path) as f:
        text = f.read()
except FileNotFoundError:
    text = ""
try:
    config = json.loads(text) if text.strip() else {}
except json.JSONDecodeError as exc:
    sys.exit(f"{path} is not valid JSON ({exc}); fix it by hand, nothing was changed")
if not isinstance(config, dict):
    sys.exit(f"{path} does not hold a JSON object; nothing was changed")
runtimes = config.setdefault("runtimes", {})
if runtimes.get("runsc") == want:
    sys.exit(0)
runtimes["runsc"] = want
os.makedirs(os.path.dirname(path), exist_ok=True)
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".daemon.json.")
with os.fdopen(fd, "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
os.chmod(tmp, 0o644)
os.replace(tmp, path)
print("changed")
PY
}

daemon_changed=0
registered="$(register_runsc)" || die "could not register runsc in $DAEMON_JSON"
if [ "$registered" = changed ]; then
    log "registered runsc in $DAEMON_JSON"
    daemon_changed=1
fi

# -- Docker engine -----------------------------------------------------------------------
dockerd_pid() {
    local pid
    pid="$(cat /var/run/docker.pid 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

if engine_answers; then
    if [ "$daemon_changed" = 1 ]; then
        # runtimes are among the options dockerd reloads on SIGHUP, no restart needed.
        if pid="$(dockerd_pid)"; then
            log "reloading dockerd ($pid) for the new runtime"
            kill -HUP "$pid"
        elif have_cmd systemctl && [ -d /run/systemd/system ]; then
            systemctl reload docker || systemctl restart docker
        fi
    fi
else
    # A dockerd that is still shutting down keeps its pid file for a moment: wait for
    # it to answer or to go away, and start one only when none is left.
    started=""
    for _ in $(seq 1 60); do
        engine_answers && break
        if [ -z "$started" ] && ! dockerd_pid >/dev/null; then
            if have_cmd systemctl && [ -d /run/systemd/system ]; then
                log "starting docker (systemd)"
                systemctl start docker
                started=systemd
            else
                log "starting dockerd (log: $DOCKERD_LOG)"
                rm -f /var/run/docker.pid
                # setsid + nohup: the engine must outlive this script and its process group.
                setsid nohup dockerd </dev/null >>"$DOCKERD_LOG" 2>&1 9>&- &
                started=$!
            fi
        elif [ -n "$started" ] && [ "$started" != systemd ] && ! kill -0 "$started" 2>/dev/null; then
            tail -n 20 "$DOCKERD_LOG" >&2 || true
            die "dockerd exited right after starting; see $DOCKERD_LOG"
        fi
        sleep 0.5
    done
    if ! engine_answers; then
        tail -n 20 "$DOCKERD_LOG" >&2 2>/dev/null || true
        die "dockerd did not answer within 30 s; see $DOCKERD_LOG"
    fi
    log "engine is up"
fi
engine_has_runsc() { docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; }
if [ "$daemon_changed" = 1 ]; then
    # A reload is asynchronous; give it a moment before judging.
    for _ in $(seq 1 20); do engine_has_runsc && break; sleep 0.5; done
fi
engine_has_runsc || log "warning: the engine does not list runsc; gVisor sandboxes will be refused"

# -- virtualenv --------------------------------------------------------------------------
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    log "creating virtualenv $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi
# Re-install when the dependency list changes; the stamp names the pyproject it matches.
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ] || [ ! -x "$VENV/bin/sandboxd" ]; then
    log "installing the project into $VENV (pip install -e .[dev,cluster])"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "${ROOT}[dev,cluster]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi

# -- base image --------------------------------------------------------------------------
role="$(docker image inspect --format '{{index .Config.Labels "sandbox.role"}}' "$BASE_IMAGE" \
    2>/dev/null || true)"
if [ "$role" != base ]; then
    [ -z "$role" ] || log "$BASE_IMAGE exists but is not a sandbox base image; replacing it"
    log "making base image $BASE_IMAGE offline (debootstrap from $MIRROR, about a minute)"
    start=$SECONDS
    "$VENV/bin/sandboxd" bootstrap-image --tag "$BASE_IMAGE" --mirror "$MIRROR" 9>&-
    log "base image made in $((SECONDS - start)) s"
fi
# -- build package proxy -----------------------------------------------------------------
# Builds under the `proxy` policy join an internal network whose only other member is
# Debian's apt-cacher-ng, which alone reaches the mirrors. The host has an address on
# that bridge too; dropping everything that comes in on it keeps builds off the host's
# services (the bridge has a fixed name so the rule can name it).
setup_build_proxy() {
    if ! docker network inspect "$BUILD_NETWORK" >/dev/null 2>&1; then
        log "making the internal build network $BUILD_NETWORK"
        docker network create --internal -o "com.docker.network.bridge.name=$BUILD_BRIDGE" \
            "$BUILD_NETWORK" >/dev/null
    fi
    iptables -C INPUT -i "$BUILD_BRIDGE" -j DROP 2>/dev/null \
        || iptables -I INPUT -i "$BUILD_BRIDGE" -j DROP
    if ! docker image inspect "$PROXY_IMAGE" >/dev/null 2>&1; then
        log "making $PROXY_IMAGE (apt-cacher-ng on $BASE_IMAGE)"
        printf 'FROM %s\nRUN apt-get update && apt-get install -y --no-install-recommends %s %s\n' \
            "$BASE_IMAGE" apt-cacher-ng "&& rm -rf /var/lib/apt/lists/*" \
            | docker build -q -t "$PROXY_IMAGE" - >/dev/null 9>&-
    fi
    if [ "$(docker inspect --format '{{.State.Running}}' "$PROXY_NAME" 2>/dev/null)" != true ]; then
        log "starting the build package proxy $PROXY_NAME on $BUILD_NETWORK"
        docker rm -f "$PROXY_NAME" >/dev/null 2>&1 || true
        docker run -d --name "$PROXY_NAME" --restart unless-stopped "$PROXY_IMAGE" \
            apt-cacher-ng -c /etc/apt-cacher-ng ForeGround=1 >/dev/null 9>&-
        docker network connect "$BUILD_NETWORK" "$PROXY_NAME"
    fi
}
if [ "$WANT_BUILD_PROXY" = 1 ]; then
    setup_build_proxy
fi

# -- Podman ------------------------------------------------------------------------------
# The second engine: `podman system service` speaks Docker's API on PODMAN_SOCKET.
# Settings go in a drop-in, merged by Podman over its defaults and any containers.conf
# the machine's owner keeps. No gVisor here: Podman 4.3's API ignores the runtime a
# container asks for (the service offers runc only with Podman; see the README).
PODMAN_DROPIN=/etc/containers/containers.conf.d/50-sandbox.conf

# Writes $2 to $1 when it differs; prints "changed" when it wrote.
write_if_changed() {
    if [ "$(cat "$1" 2>/dev/null)" != "$2" ]; then
        mkdir -p "$(dirname "$1")"
        printf '%s\n' "$2" >"$1.tmp.$$"
        mv -f "$1.tmp.$$" "$1"
        echo changed
    fi
}

podman_answers() {
    python3 - "$PODMAN_SOCKET" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
sys.exit(0 if s.recv(64).startswith(b"HTTP/1.") else 1)
PY
}

podman_pid() {
    local pid
    pid="$(cat /run/podman/sandbox-service.pid 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

setup_podman() {
    local changed
    changed="$(write_if_changed "$PODMAN_DROPIN" "# Written by the sandbox project's scripts/host-setup.sh.
[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"")"

    if [ -n "$changed" ] && pid="$(podman_pid)"; then
        log "restarting podman system service ($pid) for the new settings"
        kill "$pid"
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    fi
    if ! podman_answers; then
        log "starting podman system service on $PODMAN_SOCKET (log: $PODMAN_LOG)"
        mkdir -p "$(dirname "$PODMAN_SOCKET")" /run/podman
        rm -f "$PODMAN_SOCKET"
        # From /: conmon, started by the service for every container, inherits its working
        # directory and fails ("Failed to get working directory") once that is removed,
        # e.g. the checkout this script ran from.
        (cd / && exec setsid nohup podman system service --time=0 "unix://$PODMAN_SOCKET") \
            </dev/null >>"$PODMAN_LOG" 2>&1 9>&- &
        echo $! >/run/podman/sandbox-service.pid
        for _ in $(seq 1 60); do podman_answers && break; sleep 0.5; done
        if ! podman_answers; then
            tail -n 20 "$PODMAN_LOG" >&2 || true
            die "podman system service did not answer within 30 s; see $PODMAN_LOG"
        fi
    fi

    # The same image id in both stores: a rebuilt Docker base image is loaded again.
    local want have
    want="$(docker image inspect --format '{{.Id}}' "$BASE_IMAGE")"
    have="$(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)"
    if [ "sha256:$have" != "$want" ] && [ "$have" != "$want" ]; then
        log "loading $BASE_IMAGE into podman (docker save | podman load)"
        docker save "$BASE_IMAGE" | podman load -q >/dev/null
    fi
}
if [ "$WANT_PODMAN" = 1 ]; then
    setup_podman
fi

log "ready: engine up, venv $VENV, base image $BASE_IMAGE$([ "$WANT_PODMAN" = 1 ] && echo ", podman up")"
