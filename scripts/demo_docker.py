#!/usr/bin/env python3
"""The Docker side of scripts/demo.sh, through the docker SDK (its builds work on any engine
version, with or without BuildKit, and never pull).

    demo_docker.py build TAG BASE_IMAGE RUN_PY   an executor image: BASE_IMAGE + RUN_PY as ENTRYPOINT
    demo_docker.py cleanup SERVICE_ID            force-remove the containers agent-core made for a service
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import docker

from agent_core.executor import LABEL_SERVICE

# Non-root, as a real executor should be; output/ is writable for any uid.
DOCKERFILE = """\
FROM {base}
COPY run.py /opt/demo/run.py
USER 65534:65534
WORKDIR /workspace
ENTRYPOINT ["python3", "/opt/demo/run.py"]
LABEL agent-core.demo=executor
"""


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def build(client: docker.DockerClient, tag: str, base: str, run_py: Path) -> None:
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        _add(tar, "Dockerfile", DOCKERFILE.format(base=base).encode())
        _add(tar, "run.py", run_py.read_bytes())
    context.seek(0)
    try:
        previous = client.images.get(tag).id
    except docker.errors.ImageNotFound:
        previous = None
    try:
        image, _ = client.images.build(fileobj=context, custom_context=True, tag=tag, pull=False,
                                       network_mode="none", rm=True, forcerm=True)
    except docker.errors.BuildError as e:
        raise SystemExit(f"demo_docker: building {tag} failed: {e}") from None
    if previous and previous != image.id:
        try:  # the build before an edit of run.py: untagged now, and of no use
            client.images.remove(previous)
        except docker.errors.APIError:
            pass  # still used by a container, or removed meanwhile
    print(f"built {tag} ({image.short_id.split(':')[-1]}) from {base}")


def cleanup(client: docker.DockerClient, service_id: str) -> None:
    containers = client.containers.list(all=True, filters={"label": f"{LABEL_SERVICE}={service_id}"})
    for container in containers:
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
    if containers:
        print(f"removed {len(containers)} leftover container(s)")


def main(argv: list[str]) -> int:
    if not ((len(argv) == 4 and argv[0] == "build") or (len(argv) == 2 and argv[0] == "cleanup")):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        client = docker.from_env()
    except docker.errors.DockerException as e:
        raise SystemExit(f"demo_docker: no Docker engine: {e}") from None
    try:
        if argv[0] == "build":
            build(client, argv[1], argv[2], Path(argv[3]))
        else:
            cleanup(client, argv[1])
    except docker.errors.APIError as e:
        raise SystemExit(f"demo_docker: {e}") from None
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
