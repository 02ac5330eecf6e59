#!/usr/bin/env bash
# Make a Docker engine reachable and build agent-core's offline test images.
#
#   scripts/docker_env.sh [--rebuild] [--no-python]
#
# Idempotent and non-interactive (CI runs it as root with no stdin):
#   1. If `docker info` works (via /var/run/docker.sock or DOCKER_HOST), use that engine.
#      Otherwise, as root on Debian, install docker.io and start
#      `dockerd --bridge=none --iptables=false --ip-masq=false` in the background
#      (log: /tmp/agent-core-dockerd.log), then wait up to 60 s for it.
#   2. Build, only when missing (or always with --rebuild):
#        agent-core-test/busybox:latest  static busybox, applet symlinks, /tmp, /workspace,
#                                        /etc/passwd with root and nobody (65534), /bin/bash -> sh
#        agent-core-test/python:latest   Debian bookworm minbase + python3 (debootstrap),
#                                        /usr/bin/python -> python3
#      No image is ever pulled: both are `docker import`ed from local root filesystems.
#      The bookworm rootfs tarball is cached under ${AGENT_CORE_CACHE:-/var/cache/agent-core},
#      so a rebuild takes seconds; delete the cache to download it again.
#
# Prints one line per step; exits non-zero with a one-line reason on failure.

set -euo pipefail

BUSYBOX_IMAGE="agent-core-test/busybox:latest"
PYTHON_IMAGE="agent-core-test/python:latest"
CACHE_DIR="${AGENT_CORE_CACHE:-/var/cache/agent-core}"
DOCKERD_LOG="/tmp/agent-core-dockerd.log"
DEFAULT_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_MIRROR="http://deb.debian.org/debian"
ENGINE_WAIT_SECS=60

REBUILD=0
WITH_PYTHON=1
for arg in "$@"; do
    case "$arg" in
        --rebuild) REBUILD=1 ;;
        --no-python) WITH_PYTHON=0 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "docker_env: unknown argument: $arg (use --rebuild, --no-python)" >&2; exit 2 ;;
    esac
done

export DEBIAN_FRONTEND=noninteractive
exec </dev/null

step() { echo "docker_env: $*"; }
die() { echo "docker_env: ERROR: $*" >&2; exit 1; }

WORK_DIRS=()
cleanup() {
    local d
    for d in "${WORK_DIRS[@]+"${WORK_DIRS[@]}"}"; do
        # debootstrap may leave proc/sys mounted in the target if it fails half way.
        umount -l "$d/rootfs/dev/pts" "$d/rootfs/proc" "$d/rootfs/sys" 2>/dev/null || true
        rm -rf --one-file-system "$d" 2>/dev/null || true
    done
}
trap cleanup EXIT

is_root() { [ "$(id -u)" = 0 ]; }

APT_UPDATED=0
apt_install() {
    # apt_install PKG...: install Debian packages, running `apt-get update` only when needed.
    is_root || die "need to install $* but not running as root; install them by hand or rerun as root"
    command -v apt-get >/dev/null 2>&1 || die "need to install $* but apt-get is missing (not Debian?)"
    local pkg need_update=0
    for pkg in "$@"; do
        if ! apt-cache show "$pkg" >/dev/null 2>&1; then need_update=1; fi
    done
    if [ "$need_update" = 1 ] && [ "$APT_UPDATED" = 0 ]; then
        step "apt-get update"
        apt-get update -qq >/tmp/agent-core-apt.log 2>&1 || die "apt-get update failed (see /tmp/agent-core-apt.log)"
        APT_UPDATED=1
    fi
    step "apt-get install $*"
    if ! apt-get install -y -qq --no-install-recommends "$@" >>/tmp/agent-core-apt.log 2>&1; then
        if [ "$APT_UPDATED" = 0 ]; then
            step "apt-get update (install failed with the current package lists)"
            apt-get update -qq >>/tmp/agent-core-apt.log 2>&1 || die "apt-get update failed (see /tmp/agent-core-apt.log)"
            APT_UPDATED=1
            apt-get install -y -qq --no-install-recommends "$@" >>/tmp/agent-core-apt.log 2>&1 \
                || die "apt-get install $* failed (see /tmp/agent-core-apt.log)"
        else
            die "apt-get install $* failed (see /tmp/agent-core-apt.log)"
        fi
    fi
}

engine_ok() { command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; }

# --- 1. the engine ----------------------------------------------------------

ensure_engine() {
    if engine_ok; then
        step "engine reachable at ${DOCKER_HOST:-unix:///var/run/docker.sock} ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'), storage $(docker info --format '{{.Driver}}' 2>/dev/null || echo '?'))"
        return
    fi
    if [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST}" != "unix:///var/run/docker.sock" ]; then
        die "DOCKER_HOST=$DOCKER_HOST is set but \`docker info\` fails there; start that engine or unset DOCKER_HOST"
    fi
    is_root || die "no Docker engine is reachable at /var/run/docker.sock and not running as root to start one; start dockerd (or set DOCKER_HOST) and rerun"
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
        apt_install docker.io
    fi
    if pgrep -x dockerd >/dev/null 2>&1; then
        step "dockerd is running but not answering yet; waiting"
    else
        step "starting dockerd --bridge=none --iptables=false --ip-masq=false (log: $DOCKERD_LOG)"
        # setsid + nohup: dockerd outlives this script and the test session that called it.
        setsid nohup dockerd --bridge=none --iptables=false --ip-masq=false >>"$DOCKERD_LOG" 2>&1 &
    fi
    local deadline=$((SECONDS + ENGINE_WAIT_SECS))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if [ -S /var/run/docker.sock ] && engine_ok; then
            step "engine up ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'), storage $(docker info --format '{{.Driver}}' 2>/dev/null || echo '?'))"
            return
        fi
        sleep 1
    done
    die "dockerd did not answer within ${ENGINE_WAIT_SECS}s; last lines of $DOCKERD_LOG: $(tail -n 5 "$DOCKERD_LOG" 2>/dev/null | tr '\n' ' ')"
}

image_present() { docker image inspect "$1" >/dev/null 2>&1; }

want_image() {
    # want_image TAG: 0 when TAG must be built now.
    if [ "$REBUILD" = 1 ]; then
        return 0
    fi
    if image_present "$1"; then
        step "image $1 present"
        return 1
    fi
    return 0
}

drop_replaced() {
    # drop_replaced TAG OLD_ID: after --rebuild, remove the untagged previous image (if nothing uses it).
    local new
    new="$(docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true)"
    if [ -n "$2" ] && [ "$2" != "$new" ]; then
        docker image rm "$2" >/dev/null 2>&1 || true
    fi
}

old_id() { docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

new_work_dir() {
    local d
    d="$(mktemp -d "${TMPDIR:-/var/tmp}/agent-core-$1.XXXXXX")"
    WORK_DIRS+=("$d")
    echo "$d"
}

# --- 2a. busybox ------------------------------------------------------------

build_busybox() {
    want_image "$BUSYBOX_IMAGE" || return 0
    local bb=/bin/busybox
    if ! { [ -x "$bb" ] && file_is_static "$bb"; }; then
        apt_install busybox-static
    fi
    if ! { [ -x "$bb" ] && file_is_static "$bb"; }; then
        die "/bin/busybox is not a static binary even after installing busybox-static"
    fi
    step "building $BUSYBOX_IMAGE"
    local work root old
    old="$(old_id "$BUSYBOX_IMAGE")"
    work="$(new_work_dir busybox)"
    root="$work/rootfs"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,workspace,tmp,var/tmp,proc,sys,dev}
    cp "$bb" "$root/bin/busybox"
    local applet
    while read -r applet; do
        [ -n "$applet" ] || continue
        case "$applet" in bin/busybox) continue ;; esac
        mkdir -p "$root/$(dirname "$applet")"
        ln -sf /bin/busybox "$root/$applet"
    done < <("$bb" --list-full)
    # busybox has no bash applet; a wrapper lets the `bash` executor type run simple scripts.
    if [ ! -e "$root/bin/bash" ]; then
        printf '#!/bin/sh\nexec /bin/sh "$@"\n' >"$root/bin/bash"
        chmod 0755 "$root/bin/bash"
    fi
    chmod 1777 "$root/tmp" "$root/var/tmp"
    chmod 0755 "$root/workspace"
    chmod 0700 "$root/root"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    tar -C "$root" --numeric-owner -cf - . \
        | docker import --change "ENV PATH=$DEFAULT_PATH" --change 'CMD ["/bin/sh"]' \
            --change 'LABEL agent-core.test-image=busybox' - "$BUSYBOX_IMAGE" >/dev/null \
        || die "docker import of $BUSYBOX_IMAGE failed"
    drop_replaced "$BUSYBOX_IMAGE" "$old"
    step "image $BUSYBOX_IMAGE built"
}

file_is_static() {
    # `file` may not be installed; ldd (libc-bin) fails on a static binary.
    if command -v file >/dev/null 2>&1; then
        file -L "$1" | grep -q 'statically linked'
    elif ldd "$1" >/dev/null 2>&1; then
        return 1
    fi
}

# --- 2b. python (bookworm minbase) ------------------------------------------

build_python() {
    [ "$WITH_PYTHON" = 1 ] || { step "skipping $PYTHON_IMAGE (--no-python)"; return 0; }
    want_image "$PYTHON_IMAGE" || return 0
    local tarball="$CACHE_DIR/bookworm-minbase-python3.tar"
    if [ ! -s "$tarball" ]; then
        is_root || die "building $PYTHON_IMAGE needs debootstrap as root (or a cached $tarball)"
        command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
        mkdir -p "$CACHE_DIR"
        local work root
        work="$(new_work_dir debootstrap)"
        root="$work/rootfs"
        step "debootstrap bookworm minbase + python3 into $root (a few minutes; log: /tmp/agent-core-debootstrap.log)"
        debootstrap --variant=minbase --include=python3 bookworm "$root" "$DEBIAN_MIRROR" \
            >/tmp/agent-core-debootstrap.log 2>&1 \
            || die "debootstrap failed (see /tmp/agent-core-debootstrap.log: $(tail -n 3 /tmp/agent-core-debootstrap.log | tr '\n' ' '))"
        ln -sf python3 "$root/usr/bin/python"
        mkdir -p "$root/workspace"
        chmod 1777 "$root/tmp"
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
        # /proc, /sys and /dev are supplied by the runtime; leave them empty in the image.
        step "caching rootfs tarball at $tarball"
        tar -C "$root" --numeric-owner --exclude=./proc/* --exclude=./sys/* --exclude=./dev/* \
            -cf "$tarball.tmp" . || die "cannot write $tarball.tmp"
        mv -f "$tarball.tmp" "$tarball"
    else
        step "using cached rootfs $tarball"
    fi
    step "building $PYTHON_IMAGE"
    local old
    old="$(old_id "$PYTHON_IMAGE")"
    docker import --change "ENV PATH=$DEFAULT_PATH" --change 'CMD ["/usr/bin/python3"]' \
        --change 'LABEL agent-core.test-image=python' "$tarball" "$PYTHON_IMAGE" >/dev/null \
        || die "docker import of $PYTHON_IMAGE failed"
    drop_replaced "$PYTHON_IMAGE" "$old"
    step "image $PYTHON_IMAGE built"
}

# --- main -------------------------------------------------------------------

ensure_engine

# One builder at a time (parallel test sessions, the demo and the benchmark may all call this).
LOCK_DIR="$CACHE_DIR"
if ! mkdir -p "$LOCK_DIR" 2>/dev/null || [ ! -w "$LOCK_DIR" ]; then
    LOCK_DIR="${TMPDIR:-/tmp}"
fi
if command -v flock >/dev/null 2>&1; then
    exec 9>"$LOCK_DIR/docker_env.lock"
    flock -w 900 9 || die "another docker_env.sh held $LOCK_DIR/docker_env.lock for 15 minutes"
fi

build_busybox
build_python
step "ready: $BUSYBOX_IMAGE$([ "$WITH_PYTHON" = 1 ] && echo ", $PYTHON_IMAGE")"
