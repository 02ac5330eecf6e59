"""Fixtures for every test: the local OpenAaaS server and the Docker engine live in their own modules."""

from tests.server_fixtures import *  # noqa: F401,F403
from tests.docker_fixtures import *  # noqa: F401,F403
from tests.agent_fixtures import *  # noqa: F401,F403
