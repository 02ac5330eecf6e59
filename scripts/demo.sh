#!/usr/bin/env bash
# agent-core end to end on this machine, offline, in about a minute:
#   the in-repo OpenAaaS server on 127.0.0.1, a service, a registered agent, three tasks with
#   input files run in Docker containers (network "none") by a small executor image built from
#   scripts/demo_executor.py, each task's status and outputs, and run-detached / status / stop.
#
#   bash scripts/demo.sh       (as root on a fresh Debian-like machine, or as a user with Docker access)
#
# All state lives in a temporary folder under /tmp. On exit, also after a failure or Ctrl+C, the
# agent is stopped, the server shut down, the demo's containers removed and the folder deleted;
# the image agent-core-demo/executor:latest stays, so the next run starts sooner. Exits 0 only
# when all three tasks completed, and the last line says how it went.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

DEMO_IMAGE="agent-core-demo/executor:latest"
BASE_IMAGE="agent-core-test/python:latest"
SERVER_START_SECS=30
TASK_WAIT_SECS=150

step() { printf '\n== %s\n' "$*"; }
show() { printf '$ %s\n' "$*"; }  # a command as you would type it

DEMO_DIR=""
SETUP_LOG=""
SERVER_PID=""
SERVICE_ID=""
AGENT_MAY_RUN=0
FINAL_LINE="demo: FAILED (see the messages above)"

cleanup() {
    local code=$?
    trap - EXIT INT TERM
    set +e
    if [ "$AGENT_MAY_RUN" = 1 ]; then
        # Cut short: cancel running tasks instead of waiting for them. The server is still up
        # (it has its own session, so Ctrl+C did not reach it) and hears about them.
        echo "demo: stopping the agent"
        agent-core --config "$DEMO_DIR/config.toml" stop --force >/dev/null 2>&1
    fi
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    if [ -n "$SERVICE_ID" ]; then
        "$VENV/bin/python" "$REPO/scripts/demo_docker.py" cleanup "$SERVICE_ID"
    fi
    if [ "$code" != 0 ] && [ -n "$SETUP_LOG" ]; then
        tail -n 30 "$SETUP_LOG" >&2
    fi
    cd /
    if [ -n "$DEMO_DIR" ]; then
        rm -rf "$DEMO_DIR"
    fi
    case "$code" in 130|143) FINAL_LINE="demo: interrupted; cleaned up" ;; esac
    echo "$FINAL_LINE"
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the machine ----------------------------------------------------------

step "setting up: virtualenv, Docker engine, offline images"
DEMO_DIR="$(mktemp -d /tmp/agent-core-demo.XXXXXX)"
echo "demo: state in $DEMO_DIR"
# pip is chatty even with -q: its output goes to a log, shown only when it fails.
SETUP_LOG="$DEMO_DIR/setup.log"
echo "demo: preparing the virtualenv ${AGENT_CORE_VENV:-$PWD/.venv} (the first time takes a minute)"
# shellcheck source=scripts/venv.sh
source scripts/venv.sh >"$SETUP_LOG" 2>&1
SETUP_LOG=""
PY="$VENV/bin/python"
bash scripts/docker_env.sh
"$PY" scripts/demo_docker.py build "$DEMO_IMAGE" "$BASE_IMAGE" scripts/demo_executor.py

# --- the server -----------------------------------------------------------

step "starting the local OpenAaaS server"
# os.setsid, then exec: the server keeps this pid but leaves our session, so a Ctrl+C in the
# terminal reaches only the demo, whose cleanup stops the agent while the server still answers.
"$PY" -c 'import os, sys; os.setsid(); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])' \
    scripts/dev_server.py --port 0 --data-dir "$DEMO_DIR/server" >"$DEMO_DIR/server.log" 2>&1 &
SERVER_PID=$!
deadline=$((SECONDS + SERVER_START_SECS))
until grep -q '^admin_key ' "$DEMO_DIR/server.log"; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
        cat "$DEMO_DIR/server.log" >&2
        FINAL_LINE="demo: FAILED: the server did not start"
        exit 1
    fi
    sleep 0.2
done
AAAS_URL="$(awk '$1 == "url" {print $2; exit}' "$DEMO_DIR/server.log")"
AAAS_ADMIN_KEY="$(awk '$1 == "admin_key" {print $2; exit}' "$DEMO_DIR/server.log")"
export AAAS_URL AAAS_ADMIN_KEY  # for demo_client.py
echo "server at $AAAS_URL (pid $SERVER_PID)"

service="$("$PY" scripts/demo_client.py service "agent-core demo")"
read -r SERVICE_ID TOKEN <<<"$service"
echo "created service $SERVICE_ID; its one-time registration token goes to the agent"

# --- the agent ------------------------------------------------------------

step "configuring and registering the agent"
cd "$DEMO_DIR"  # config.toml and data/ go here, so the commands below are the plain ones
show "agent-core init --server $AAAS_URL"
agent-core init --server "$AAAS_URL"
"$PY" - "$DEMO_IMAGE" <<'EOF'
import sys

from agent_core import config

settings = {
    "executor.image": sys.argv[1],                       # built above; agent-core never pulls
    "executor.executor_type": "standard",                # the image's ENTRYPOINT
    "executor.network_mode": "none",                     # the demo's tasks need no network
    "server.poll_interval_secs": 1,
}
config.update("config.toml", settings)
for key, value in settings.items():
    print(f"set {key} = {value!r}")
EOF
show "agent-core register --token rt_…"
agent-core register --token "$TOKEN" --name demo

step "submitting three tasks with input files"
"$PY" "$REPO/scripts/demo_client.py" submit "$SERVICE_ID" task_ids

step "running the agent in the background"
AGENT_MAY_RUN=1
show "agent-core run-detached"
agent-core run-detached
show "agent-core status"
agent-core status

step "waiting for the tasks (at most ${TASK_WAIT_SECS} s); their results"
tasks_ok=1
"$PY" "$REPO/scripts/demo_client.py" results task_ids results --timeout "$TASK_WAIT_SECS" || tasks_ok=0

step "stopping the agent"
show "agent-core stop"
agent-core stop
AGENT_MAY_RUN=0

if [ "$tasks_ok" != 1 ]; then
    echo "last lines of the agent's log ($DEMO_DIR/data/agent.log):" >&2
    tail -n 30 data/agent.log >&2 || true
    FINAL_LINE="demo: FAILED: not every task completed"
    exit 1
fi
FINAL_LINE="demo: $(wc -l <task_ids | tr -d ' ') tasks completed"
