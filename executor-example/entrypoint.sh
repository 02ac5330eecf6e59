#!/usr/bin/env bash
# Entrypoint of the example executor image: the pi coding agent answers one OpenAaaS task.
#
# agent-core mounts the task's workspace at /workspace (see README.md next to this file):
#   task.json, input/NN-<name> (the input files), output/ (empty, writable)
# This script
#   1. reads the task prompt (.task_prompt, else .prompt) and .output_prompt from task.json;
#   2. runs pi once in print mode on the prompt, naming the input files and asking for
#      output/response.md (pi's printed answer is used when it did not write that file);
#   3. with an output prompt, runs a second pass that reformats output/response.md;
#   4. always leaves output/response.md, a placeholder saying why when there is no answer.
# Exit 0 = task completed. Any other exit = task failed; the last lines of stderr become the
# task's error message, so every failure ends with one "entrypoint: ..." line saying what went wrong.
#
# Environment: PI_ARGS (pi's options, see below), PI_BIN (default: pi), TIMEOUT (seconds,
# 0 = none, set by agent-core), WORKSPACE (default /workspace; for testing the script).
set -euo pipefail

WORKSPACE="${WORKSPACE:-/workspace}"
TASK_JSON="$WORKSPACE/task.json"
INPUT_DIR="$WORKSPACE/input"
OUTPUT_DIR="$WORKSPACE/output"
RESPONSE="$OUTPUT_DIR/response.md"
PI_BIN="${PI_BIN:-pi}"

# How pi is called, without the prompt (a space-separated list; override with the PI_ARGS env):
#   --print       answer once, write the final text to stdout and exit (no terminal UI)
#   --no-session  nothing to resume between tasks, and nothing written to the config dir
# e.g. PI_ARGS="--print --no-session --model sonnet" picks a model.
DEFAULT_PI_ARGS="--print --no-session"
read -r -a PI_ARGV <<<"${PI_ARGS:-$DEFAULT_PI_ARGS}"
# The formatting pass only rewrites text: no tools, so it cannot touch the workspace.
FORMAT_ARGV=("${PI_ARGV[@]}" --no-tools)

# What the placeholder response says when there is no answer; updated as the script goes.
NO_ANSWER_REASON="the executor stopped before the agent ran"
SCRATCH="$(mktemp -d)"

# shellcheck disable=SC2317  # called by the EXIT trap
finish() {
    local code=$?
    if [ ! -s "$RESPONSE" ] && [ -d "$OUTPUT_DIR" ] && [ -w "$OUTPUT_DIR" ]; then
        printf '# No answer\n\nThe agent produced no output: %s.\n' "$NO_ANSWER_REASON" >"$RESPONSE" || true
    fi
    rm -rf "$SCRATCH"
    exit "$code"
}
trap finish EXIT

fail() {
    # fail MESSAGE [EXIT_CODE]: the last stderr line, which becomes the task's error message.
    echo "entrypoint: $1" >&2
    exit "${2:-2}"
}

warn() { echo "entrypoint: warning: $1" >&2; }

# --- 1. the task ---------------------------------------------------------

command -v jq >/dev/null || fail "jq is missing from the image (the entrypoint reads task.json with it)"
if [ ! -f "$TASK_JSON" ] || [ ! -r "$TASK_JSON" ]; then
    NO_ANSWER_REASON="$TASK_JSON is missing"
    fail "$TASK_JSON is missing or not readable (is the task workspace mounted at $WORKSPACE?)"
fi
# A prompt of only whitespace counts as missing, as does a non-string one.
if ! PROMPT="$(jq -r 'first((.task_prompt, .prompt) | select(type == "string" and test("\\S"))) // empty' \
        "$TASK_JSON" 2>"$SCRATCH/jq.err")"; then
    NO_ANSWER_REASON="task.json could not be read"
    fail "$TASK_JSON is not a JSON object: $(head -c 300 "$SCRATCH/jq.err")"
fi
if [ -z "$PROMPT" ]; then
    NO_ANSWER_REASON="the task has no prompt"
    fail "no task prompt: task.json has neither a non-empty .task_prompt nor .prompt"
fi
OUTPUT_PROMPT="$(jq -r '.output_prompt | select(type == "string" and test("\\S")) // empty' "$TASK_JSON")"

INPUTS=()
if [ -d "$INPUT_DIR" ]; then
    shopt -s nullglob
    for f in "$INPUT_DIR"/*; do
        [ -f "$f" ] && INPUTS+=("$f")
    done
    shopt -u nullglob
fi

# --- 2. the agent --------------------------------------------------------

# The instructions come first, so a prompt starting with "-" is never taken for an option.
FULL_PROMPT="You are working unattended on a task from a queue: nobody can answer questions, so make \
reasonable assumptions and say which. The working directory is $WORKSPACE.
"
if [ "${#INPUTS[@]}" -gt 0 ]; then
    FULL_PROMPT+="
Input files (read them as needed; do not modify them):
$(printf -- '- %s\n' "${INPUTS[@]}")
"
else
    FULL_PROMPT+="
There are no input files.
"
fi
if [ "${TIMEOUT:-0}" -gt 0 ] 2>/dev/null; then
    FULL_PROMPT+="
You have about $(( (TIMEOUT + 59) / 60 )) minute(s); the task is stopped after that.
"
fi
FULL_PROMPT+="
Write your final answer, in Markdown, to $RESPONSE: that file is what the user receives.
Put any other files you make for the user in $OUTPUT_DIR/.

The task:
$PROMPT
"

# pi keeps its settings and credentials in ~/.pi/agent. agent-core mounts them read-only, but pi
# may write there (refreshed OAuth tokens, caches): give it a private writable copy for this task.
PI_CONFIG_DIR="${PI_CODING_AGENT_DIR:-${HOME:-/home/agent}/.pi/agent}"
if [ -d "$PI_CONFIG_DIR" ] && [ ! -w "$PI_CONFIG_DIR" ]; then
    cp -R "$PI_CONFIG_DIR" "$SCRATCH/pi-agent"
    chmod -R u+w "$SCRATCH/pi-agent"
    export PI_CODING_AGENT_DIR="$SCRATCH/pi-agent"
fi

if ! command -v "$PI_BIN" >/dev/null; then
    NO_ANSWER_REASON="pi is not installed"
    fail "pi not found (PI_BIN=$PI_BIN): is @earendil-works/pi-coding-agent installed in the image?" 127
fi
cd "$WORKSPACE"
set +e
"$PI_BIN" "${PI_ARGV[@]}" "$FULL_PROMPT" </dev/null >"$SCRATCH/answer.md"
PI_STATUS=$?
set -e
cat "$SCRATCH/answer.md"  # the printed answer also lands in the task's stdout

# pi was asked to write response.md itself; its printed answer stands in when it did not.
if [ ! -s "$RESPONSE" ] && [ -s "$SCRATCH/answer.md" ]; then
    cp "$SCRATCH/answer.md" "$RESPONSE"
fi
if [ "$PI_STATUS" -ne 0 ]; then
    NO_ANSWER_REASON="pi failed with exit code $PI_STATUS"
    fail "pi failed with exit code $PI_STATUS" "$PI_STATUS"
fi
if [ ! -s "$RESPONSE" ]; then
    NO_ANSWER_REASON="pi finished without writing an answer"
    warn "pi finished without writing an answer; output/response.md is a placeholder"
    exit 0
fi

# --- 3. the formatting pass ----------------------------------------------

if [ -n "$OUTPUT_PROMPT" ]; then
    # pi puts piped stdin (the answer) before the prompt.
    FORMAT_PROMPT="Above is the answer to a task. Rewrite it as the instructions below say, and print \
only the rewritten answer.

Instructions:
$OUTPUT_PROMPT"
    set +e
    "$PI_BIN" "${FORMAT_ARGV[@]}" "$FORMAT_PROMPT" <"$RESPONSE" >"$SCRATCH/formatted.md"
    FORMAT_STATUS=$?
    set -e
    if [ "$FORMAT_STATUS" -ne 0 ]; then
        fail "formatting with the output prompt failed (pi exit code $FORMAT_STATUS); output/response.md \
holds the unformatted answer" "$FORMAT_STATUS"
    fi
    if [ -s "$SCRATCH/formatted.md" ]; then
        cp "$SCRATCH/formatted.md" "$RESPONSE"
    else
        warn "the formatting pass printed nothing; output/response.md holds the unformatted answer"
    fi
fi
exit 0
