# Sourced by the scripts: makes ./.venv (or $AGENT_CORE_VENV) with agent-core installed, sets $VENV.
VENV="${AGENT_CORE_VENV:-$PWD/.venv}"
if ! "$VENV/bin/python" -c "import agent_core, pytest, pytest_timeout" 2>/dev/null; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
        echo "python3 venv support is missing; installing python3-venv" >&2
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
    echo "creating virtualenv $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
fi
# an editable install follows code changes by itself; reinstall only when the dependencies change
stamp="$VENV/.agent-core-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing agent-core into $VENV"
    "$VENV/bin/pip" install -q -e ".[test]"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
