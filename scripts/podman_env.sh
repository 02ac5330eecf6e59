#!/usr/bin/env bash
# Make a rootful Podman service reachable on a socket of agent-core's own, with the test images.
#
#   scripts/podman_env.sh
#
# Idempotent and non-interactive (CI runs it as root with no stdin); run it after
# scripts/docker_env.sh, which builds the test images this one copies:
#   1. As root on Debian, install podman (and uidmap, for rootless Podman) when missing.
#   2. Write $PODMAN_DIR/containers.conf with `default_ulimits = []`: Podman's built-in
#      default (nofile 1048576) is above this sandbox's hard limit, and every container fails
#      with "error setting rlimit type 7: operation not permitted". /etc is never changed; the service gets CONTAINERS_CONF pointing at this file.
#   3. Unless $PODMAN_SOCK already answers, start
#      `podman system service --time=0 unix://$PODMAN_SOCK` in the background
#      (log: /tmp/agent-core-podman.log), then wait up to 60 s for it.
#   4. Copy each test image Podman lacks, or has in another version, from Docker
#      (`docker save IMG | podman load`).
#   5. Print `podman_env: ready: unix://$PODMAN_SOCK` as its last line (callers read it).
#
# AGENT_CORE_PODMAN_DIR moves $PODMAN_DIR (default /run/agent-core-podman).
# Exits non-zero with a one-line reason on failure.

set -euo pipefail

PODMAN_DIR="${AGENT_CORE_PODMAN_DIR:-/run/agent-core-podman}"
PODMAN_SOCK="$PODMAN_DIR/podman.sock"
PODMAN_URL="unix://$PODMAN_SOCK"
PODMAN_LOG="/tmp/agent-core-podman.log"
IMAGES=("agent-core-test/busybox:latest" "agent-core-test/python:latest")
SERVICE_WAIT_SECS=60

step() { echo "podman_env: $*"; }
die() { echo "podman_env: ERROR: $*" >&2; exit 1; }

if [ "$#" -gt 0 ]; then  # no options: only the help
    case "$1" in -h|--help) ;; *) echo "podman_env: takes no argument (see --help)" >&2; exit 2 ;; esac
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
exec </dev/null

[ "$(id -u)" = 0 ] || die "run as root: it starts the rootful Podman service (rootless Podman: see docs/engines.md)"

# --- 1. podman -----------------------------------------------------------------

# uidmap (newuidmap) is for rootless Podman, which the tests try too (docs/engines.md)
MISSING=()
command -v podman >/dev/null 2>&1 || MISSING+=(podman)
command -v newuidmap >/dev/null 2>&1 || MISSING+=(uidmap)
if [ "${#MISSING[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "${MISSING[*]} missing and apt-get too (not Debian?)"
    step "apt-get install ${MISSING[*]}"
    { apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/tmp/agent-core-apt.log 2>&1; } || {
        step "apt-get update (install failed with the current package lists)"
        apt-get update -qq >>/tmp/agent-core-apt.log 2>&1 || die "apt-get update failed (see /tmp/agent-core-apt.log)"
        apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >>/tmp/agent-core-apt.log 2>&1 \
            || die "apt-get install ${MISSING[*]} failed (see /tmp/agent-core-apt.log)"
    }
fi

# --- 2. its own containers.conf --------------------------------------------------

mkdir -p "$PODMAN_DIR"
chmod 0711 "$PODMAN_DIR"
CONF="$PODMAN_DIR/containers.conf"
WANT_CONF=$'[containers]\ndefault_ulimits = []'
if [ "$(cat "$CONF" 2>/dev/null)" != "$WANT_CONF" ]; then
    printf '%s\n' "$WANT_CONF" >"$CONF.tmp" && mv -f "$CONF.tmp" "$CONF"
fi
export CONTAINERS_CONF="$CONF"

# --- 3. the service ---------------------------------------------------------------

answers() {
    # The Docker-compatible API's ping, as agent-core will use it (curl may be missing: python is not).
    [ -S "$PODMAN_SOCK" ] && python3 - "$PODMAN_SOCK" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
reply = s.recv(64)
sys.exit(0 if reply.startswith(b"HTTP/1.") and b" 200 " in reply[:16] else 1)
EOF
}

podman_cli() { podman --url "$PODMAN_URL" "$@"; }

if answers; then
    step "service answers at $PODMAN_URL ($(podman_cli version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
else
    rm -f "$PODMAN_SOCK"  # a socket left by a service that died
    step "starting podman system service --time=0 $PODMAN_URL (log: $PODMAN_LOG)"
    # setsid + nohup: the service outlives this script and the test session that called it.
    setsid nohup podman system service --time=0 "$PODMAN_URL" >>"$PODMAN_LOG" 2>&1 &
    deadline=$((SECONDS + SERVICE_WAIT_SECS))
    until answers; do
        [ "$SECONDS" -lt "$deadline" ] \
            || die "podman did not answer at $PODMAN_URL within ${SERVICE_WAIT_SECS}s; last lines of $PODMAN_LOG: $(tail -n 5 "$PODMAN_LOG" 2>/dev/null | tr '\n' ' ')"
        sleep 0.5
    done
    step "service up at $PODMAN_URL ($(podman_cli version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
fi

# --- 4. the test images -------------------------------------------------------------

# The image id is the digest of its config, kept by save | load: equal ids, the same image.
for image in "${IMAGES[@]}"; do
    want="$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
    have="$(podman_cli image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
    if [ -z "$want" ]; then
        if [ -n "$have" ]; then step "image $image present (not in Docker)"; else
            step "image $image is not in Docker either (run scripts/docker_env.sh first); skipped"; fi
    elif [ "sha256:${have#sha256:}" = "$want" ]; then
        step "image $image present"
    else
        step "loading $image from Docker"
        docker save "$image" | podman_cli load -q >/dev/null || die "docker save $image | podman load failed"
    fi
done

step "ready: $PODMAN_URL"
