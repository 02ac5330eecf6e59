"""agent-core: turns a Docker host into an execution node for an OpenAaaS server."""

__version__ = "0.1.0"
