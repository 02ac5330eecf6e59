"""Fixtures for the in-repo OpenAaaS server (agent_core.devserver).

    dev_server       function  a started DevServer on 127.0.0.1:<free port>, data under tmp_path
    dev_client       function  a DevClient (admin key) for dev_server
    make_dev_server  function  factory: make_dev_server(**DevServer kwargs) -> started DevServer;
                               every server it made is stopped in teardown
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from agent_core.devclient import DevClient
from agent_core.devserver import DevServer

__all__ = ["dev_client", "dev_server", "make_dev_server"]


@pytest.fixture
def make_dev_server(tmp_path) -> Iterator[Callable[..., DevServer]]:
    servers: list[DevServer] = []

    def make(**kwargs) -> DevServer:
        kwargs.setdefault("data_dir", tmp_path / f"devserver-{len(servers)}")
        server = DevServer(**kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def dev_server(make_dev_server) -> DevServer:
    return make_dev_server()


@pytest.fixture
def dev_client(dev_server) -> Iterator[DevClient]:
    with DevClient(dev_server.url, dev_server.admin_key) as client:
        yield client
