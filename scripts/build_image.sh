#!/usr/bin/env bash
# Build agent-core's own image offline: the wheels go into a build context, then `docker build`.
#
#   scripts/build_image.sh [--base IMAGE] [--tag TAG]
#
# --base  the Python image to build FROM (default python:3.11-slim; it must be present locally,
#         nothing is pulled: CI passes agent-core-test/python:latest)
# --tag   the image name (default agent-core:latest)
# Wheels come from the pip cache or PyPI (the one registry these machines reach); the build itself
# runs with no network.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE="python:3.11-slim"
TAG="agent-core:latest"
while [ $# -gt 0 ]; do
    case "$1" in
        --base) BASE="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build_image: unknown argument: $1 (use --base, --tag)" >&2; exit 2 ;;
    esac
done
exec </dev/null

PYTHON="${VENV:-.venv}/bin/python"
[ -x "$PYTHON" ] || PYTHON=python3
docker image inspect "$BASE" >/dev/null 2>&1 \
    || { echo "build_image: base image $BASE is not present and nothing is pulled; build or load it first" >&2; exit 1; }

CONTEXT="$(mktemp -d "${TMPDIR:-/tmp}/agent-core-image.XXXXXX")"
trap 'rm -rf "$CONTEXT"' EXIT
mkdir "$CONTEXT/wheels"
echo "build_image: wheels of agent-core and its dependencies"
"$PYTHON" -m pip wheel --quiet --wheel-dir "$CONTEXT/wheels" . pip >/dev/null
cp Dockerfile "$CONTEXT/Dockerfile"
echo "build_image: docker build --build-arg BASE=$BASE -t $TAG"
# the classic builder: it builds FROM a local image without asking a registry about it
if ! DOCKER_BUILDKIT=0 docker build --network none --build-arg "BASE=$BASE" -t "$TAG" "$CONTEXT" \
        >"$CONTEXT/build.log" 2>&1; then
    tail -n 20 "$CONTEXT/build.log" >&2
    echo "build_image: docker build failed" >&2
    exit 1
fi
echo "build_image: ready: $TAG"
