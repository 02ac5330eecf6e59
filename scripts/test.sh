#!/usr/bin/env bash
# The test-suite on a fresh machine: a virtualenv with agent-core and its test tools,
# a reachable Docker engine with the offline test images, the Podman service beside it
# (the end-to-end core runs on both), then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
bash scripts/docker_env.sh
# Podman's last line names its socket; without it the Podman tests skip (and fail with CI=true).
if podman_out="$(bash scripts/podman_env.sh)"; then
    echo "$podman_out"
    export AGENT_CORE_PODMAN_URL="${podman_out##*podman_env: ready: }"
else
    echo "${podman_out:-}"
    echo "test.sh: no Podman service: the Podman tests skip (or fail, with CI=true)" >&2
fi
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
