#!/usr/bin/env python3
"""Run the in-repo OpenAaaS dev server until SIGINT/SIGTERM.

    python scripts/dev_server.py --port 8080 [--data-dir D] [--rate-limit 150]
                                 [--heartbeat-timeout 60] [--request-timeout 30] [--admin-key K]

Prints two lines on stdout, then serves quietly:

    url http://127.0.0.1:8080
    admin_key admin_...
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

try:
    from agent_core.devserver import DevServer
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from agent_core.devserver import DevServer


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Local OpenAaaS server for tests and demos.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (default 8080)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where file bytes go (default: a temporary directory, removed at exit)")
    parser.add_argument("--rate-limit", type=int, default=150, help="agent requests per window, 0 = off")
    parser.add_argument("--rate-window", type=float, default=60, help="rate limit window in seconds")
    parser.add_argument("--heartbeat-timeout", type=float, default=60, help="seconds before offline")
    parser.add_argument("--sweep-interval", type=float, default=10, help="seconds between sweeps")
    parser.add_argument("--max-file-bytes", type=int, default=50 * 1024 ** 2)
    parser.add_argument("--request-timeout", type=float, default=30,
                        help="seconds an upload may take before a 408, 0 = no limit")
    parser.add_argument("--admin-key", default=None, help="default: random")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    stop = threading.Event()
    # handlers only flip the flag; the main thread does the shutdown
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = DevServer(host=args.host, port=args.port, data_dir=args.data_dir, admin_key=args.admin_key,
                       rate_limit_per_minute=args.rate_limit, rate_window_secs=args.rate_window,
                       heartbeat_timeout_secs=args.heartbeat_timeout, sweep_interval_secs=args.sweep_interval,
                       max_file_bytes=args.max_file_bytes, request_timeout_secs=args.request_timeout)
    try:
        server.start()
    except OSError as exc:
        print(f"dev_server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"url {server.url}", flush=True)
        print(f"admin_key {server.admin_key}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
