"""The reference agent's `custom` executor settings, end to end: the real CLI, the local server, Docker."""

from __future__ import annotations

import uuid

import docker.errors
import pytest

from tests.agent_fixtures import wait_until

pytestmark = pytest.mark.docker

DONE = ("completed", "failed", "cancelled")


def run_one(make_agent, dev_client, settings: dict) -> dict:
    agent = make_agent({"executor.executor_type": "custom", **settings})
    task_id = dev_client.submit_task(agent.service_id, "p")["id"]
    agent.start()
    result = dev_client.wait_for_status(task_id, DONE, timeout=120)
    assert result["status"] == "completed", result
    return result


@pytest.mark.parametrize("entrypoint, args, stdout", [
    (["/bin/sh"], ["-c", "echo hi"], "hi"),  # the reference README's pair
    # the whole list is the ENTRYPOINT (the reference would hand "-c" to `docker run`); args follow it
    (["/bin/sh", "-c"], ['echo "$0" hello', "zero"], "zero hello"),
    ("/bin/sh", ["-c", "echo one string"], "one string"),  # older agent-core configs: a lone string
])
def test_each_custom_entrypoint_form_runs(make_agent, dev_client, entrypoint, args, stdout):
    result = run_one(make_agent, dev_client, {"executor.custom_entrypoint": entrypoint,
                                              "executor.custom_args": args})
    assert result["output"]["stdout"].strip() == stdout


@pytest.fixture
def entrypoint_image(docker_engine, busybox_image, docker_cleanup):
    """busybox with ENTRYPOINT ["/bin/sh", "-c"] and CMD ["echo from-image-cmd"], made here (nothing pulled)."""
    container = docker_engine.containers.create(busybox_image, command=["true"], labels=docker_cleanup.labels)
    docker_cleanup.track(container.id)
    tag = f"agent-core-test/entrypoint:{uuid.uuid4().hex[:12]}"
    container.commit(repository=tag.split(":")[0], tag=tag.split(":")[1],
                     changes=['ENTRYPOINT ["/bin/sh", "-c"]', 'CMD ["echo from-image-cmd"]'])
    yield tag
    wait_until(lambda: _removed(docker_engine, tag), 30, f"{tag} to be removed")


def _removed(docker_engine, tag: str) -> bool:
    try:
        docker_engine.images.remove(tag, force=True)
    except docker.errors.NotFound:
        return True
    except docker.errors.APIError:
        return False  # a container of the agent may still hold it for a moment
    return True


def test_custom_without_entrypoint_runs_the_images_entrypoint_with_custom_args(make_agent, dev_client,
                                                                             entrypoint_image):
    result = run_one(make_agent, dev_client, {"executor.image": entrypoint_image,
                                              "executor.custom_args": ["echo from-args $TASK_ID"]})
    assert result["output"]["stdout"].strip() == f"from-args {result['id']}"


def test_custom_with_neither_set_runs_the_image_as_it_is(make_agent, dev_client, entrypoint_image):
    result = run_one(make_agent, dev_client, {"executor.image": entrypoint_image})
    assert result["output"]["stdout"].strip() == "from-image-cmd"
