"""A local OpenAaaS server for integration tests and the demo (stdlib only).

It speaks the agent protocol of ``shared/protocol.md`` §1-4 with the reference
server's quirks (plain-text body errors, 400 on a lost accept, a rate limit
counted before auth, ...), keeps its state in memory behind one lock and stores
file bytes under ``data_dir``. Uploads and downloads are streamed in both
directions, so a 1 GiB file is never held in memory.

What the real server was seen doing (protocol.md, *observed*), and this one does too:

- (observed) A service that exists but never registered (no key stored yet) gets 401.
- (observed) The rate limit slides per request and counts only requests let through
  (refusals do not extend it); every 429 says ``Retry-After: 60``, whatever the window.
- (observed) Answers come before the request body is read: a file over the size limit
  (400) and a 429 are sent while the client is still sending, then the connection closes.
- (observed) ``request_timeout_secs`` (30) cuts off request bodies, i.e. uploads, that run
  past it: 408 with an empty body, then the connection closes. Downloads run on.
- (observed) Downloads are chunked, without Content-Length, and gzip-compressed whenever
  the request's Accept-Encoding allows gzip, whatever the file type.
- (observed) Each upload first empties its task's temporary folder, so an upload still
  running when another one to the same task starts loses its file and answers 500.
- (observed) A heartbeat refused with 400 still counts as a sign of life (and turns
  ``offline`` into ``online``); one without ``capacity`` stores its ``current_load`` unchecked.

    with DevServer(data_dir=tmp_path) as server:
        server.url, server.admin_key          # where and how to talk to it
        server.faults.fail_next(2, status=503) # inject faults
        server.calls_to("/heartbeat")          # what the agent sent
        server.restart(down_for=5)             # same port, state kept

Layers, bottom up: ``_Body`` / ``_MultipartReader`` (streaming request bodies),
``_Store`` (protocol semantics, one lock), ``Faults`` and ``_RateLimiter``
(knobs), ``_App`` (routing, auth, JSON shapes), ``_Handler`` / ``_HTTPServer``
(HTTP plumbing), ``DevServer`` (lifecycle, sweeper, what tests look at).
"""

from agent_core.devserver.faults import Faults
from agent_core.devserver.routes import Call
from agent_core.devserver.server import DevServer

__all__ = ["Call", "DevServer", "Faults"]
