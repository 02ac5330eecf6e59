# agent-core in a container: `agent-core run` as PID 1, talking to the engine through its socket.
#
#   scripts/build_image.sh [--base IMAGE] [--tag TAG]
#
# builds it offline: the script puts the project's wheel, its dependencies' wheels and pip's own
# wheel into the build context, so this file installs with --no-index and never reaches a registry.
# BASE is any image with Python 3.10+ (python:3.11-slim by default; CI uses the Debian test image).
ARG BASE=python:3.11-slim
FROM ${BASE}

COPY wheels/ /tmp/wheels/
# pip runs from its own wheel, so a base without pip (Debian's minbase python3) works too;
# --break-system-packages: Debian's python refuses pip installs outside a virtualenv, a container is ours.
RUN python3 "$(ls /tmp/wheels/pip-*.whl)/pip" install --no-index --find-links /tmp/wheels \
        --no-cache-dir --break-system-packages --root-user-action=ignore agent-core \
    && rm -rf /tmp/wheels \
    && mkdir -p /etc/agent-core /var/lib/agent-core

# The config and the data dir live in volumes; `register` writes the config, so it must be writable.
WORKDIR /etc/agent-core
VOLUME ["/etc/agent-core", "/var/lib/agent-core"]
ENV PYTHONUNBUFFERED=1
# SIGTERM (docker stop) starts the drain: give the container `agent.shutdown_grace_secs` + 60 s,
# e.g. `docker stop -t 360` or compose's stop_grace_period, or running tasks are cut off.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "agent_core", "--config", "/etc/agent-core/config.toml"]
CMD ["run"]
