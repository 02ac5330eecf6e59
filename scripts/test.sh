#!/usr/bin/env bash
# The test-suite on a fresh machine: a virtualenv with agent-core and its test tools,
# a reachable Docker engine with the offline test images, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
bash scripts/docker_env.sh
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
