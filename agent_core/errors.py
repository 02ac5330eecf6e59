"""Every error agent-core raises on purpose.

Messages are safe to show an operator: they never hold the api_key or a
registration token. Third-party exceptions (httpx, docker, OSError) are
translated into these only at the edges (client, executor, workspace, journal).

    AgentError                      exit code 1 unless said otherwise
    ├── ConfigError                 a bad config file or value (exit 2)
    ├── UsageError                  bad command-line use (exit 2)
    ├── JournalError                a task record that cannot be read or written
    ├── ProcessError
    │   ├── AlreadyRunning          a live daemon holds the data dir
    │   └── NotRunning              no daemon to stop
    ├── WorkspaceError
    │   ├── UnsafePath              a name or id from outside that would escape
    │   └── DiskFull                below min_free_disk_mb
    ├── ServerError
    │   ├── ServerUnavailable       transport error, timeout, 408, 429, 5xx (retryable)
    │   ├── ServerRejected          any other 4xx (final); .status, .endpoint
    │   │   ├── AuthRejected        401/403: credentials refused
    │   │   └── TaskGone            accept 400/409, complete 400: not ours any more
    │   └── ProtocolViolation       a reply we cannot parse or trust
    └── ExecutorError
        ├── DockerUnavailable       the engine cannot be reached (retry later)
        ├── ImageMissing            the image is not on this host (the task fails)
        └── ContainerVanished       our container is gone
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2


class AgentError(Exception):
    exit_code = EXIT_FAILURE


class ConfigError(AgentError):
    exit_code = EXIT_USAGE


class UsageError(AgentError):
    exit_code = EXIT_USAGE


class JournalError(AgentError):
    pass


class ProcessError(AgentError):
    pass


class AlreadyRunning(ProcessError):
    pass


class NotRunning(ProcessError):
    pass


class WorkspaceError(AgentError):
    pass


class UnsafePath(WorkspaceError):
    pass


class DiskFull(WorkspaceError):
    pass


class ServerError(AgentError):
    def __init__(self, message: str, *, endpoint: str = "", status: int | None = None):
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


class ServerUnavailable(ServerError):
    def __init__(self, message: str, *, endpoint: str = "", status: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message, endpoint=endpoint, status=status)
        self.retry_after = retry_after


class ServerRejected(ServerError):
    pass


class AuthRejected(ServerRejected):
    pass


class UploadRefused(ServerRejected):
    """The server will never take this output file (over its size limit, or longer to send than
    its request timeout): final for the file, and the task must say so."""


class TaskGone(ServerRejected):
    pass


class ProtocolViolation(ServerError):
    pass


class ExecutorError(AgentError):
    pass


class DockerUnavailable(ExecutorError):
    pass


class ImageMissing(ExecutorError):
    pass


class ContainerVanished(ExecutorError):
    pass


class EngineLost(ExecutorError):
    """An engine stayed away past executor.engine_grace_secs: its running tasks fail with this."""
