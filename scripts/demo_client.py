#!/usr/bin/env python3
"""The OpenAaaS side of scripts/demo.sh: admin and client calls through agent_core.devclient.

    demo_client.py service NAME          prints "<service id> <registration token>"
    demo_client.py submit SERVICE_ID IDS_FILE
                                         submits the demo's tasks with input files; ids go to IDS_FILE
    demo_client.py results IDS_FILE DEST [--timeout S]
                                         waits for the tasks, prints each one's status and output
                                         files (downloaded to DEST) with their first lines;
                                         exit 0 only when every task completed

The server is AAAS_URL with the admin key AAAS_ADMIN_KEY (environment: keys stay out of argv).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from agent_core.devclient import DevClient
from agent_core.workspace import safe_name

DONE = ("completed", "failed", "cancelled")
SHOW_LINES = 5

_MEASUREMENTS = "time,temperature_c,humidity_pct\n" + "".join(
    f"2024-05-01T{h:02d}:00,{14 + h * 0.6:.1f},{80 - h * 1.5:.0f}\n" for h in range(24))

# (task prompt, output prompt, {input file name: content}); the names show how the agent
# sanitises them (spaces and non-ASCII letters stay, paths would not).
TASKS = [
    ("Summarise the meeting notes", "Keep it under ten lines", {
        "meeting notes.md": "# Weekly sync\n\n- Release 1.2 slips a week: the migration needs a dry run.\n"
                            "- Ana takes the on-call rota from Monday.\n- Next sync: Thursday.\n",
        "action-items.txt": "dry-run the migration (Ben)\nupdate the rota (Ana)\nbook a room\n",
    }),
    ("Describe the measurements", None, {"measurements.csv": _MEASUREMENTS}),
    ("Review the script and its notes", None, {
        "hello.py": 'import sys\n\n\ndef main():\n    print("hello,", sys.argv[1:] or "world")\n\n\nmain()\n',
        "überblick.txt": "Kurzer Überblick: das Skript grüßt.\nEs hat keine Tests.\n",
    }),
]


def _client() -> DevClient:
    try:
        return DevClient(os.environ["AAAS_URL"], os.environ["AAAS_ADMIN_KEY"])
    except KeyError as e:
        raise SystemExit(f"demo_client: set {e.args[0]} (the server's url and admin key)") from None


def cmd_service(args: argparse.Namespace) -> int:
    with _client() as dev:
        svc = dev.create_service(args.name, description="agent-core demo", usage="scripts/demo.sh")
    print(svc["id"], svc["registration_token"])
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    ids = []
    with _client() as dev:
        for prompt, output_prompt, files in TASKS:
            task = dev.submit_task(args.service_id, prompt, output_prompt=output_prompt,
                                   files=[(name, text.encode()) for name, text in files.items()])
            ids.append(task["id"])
            print(f"  task {task['id']}: {prompt!r} with {', '.join(files)}", flush=True)
    Path(args.ids_file).write_text("".join(f"{i}\n" for i in ids))
    return 0


def _first_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n") for _, line in zip(range(SHOW_LINES), f)]


def cmd_results(args: argparse.Namespace) -> int:
    ids = Path(args.ids_file).read_text().split()
    dest = Path(args.dest)
    deadline = time.monotonic() + args.timeout
    completed = 0
    with _client() as dev:
        for task_id in ids:
            try:
                task = dev.wait_for_status(task_id, DONE, timeout=max(0.0, deadline - time.monotonic()),
                                           interval=0.5)
            except TimeoutError:
                print(f"task {task_id}: still {dev.get_task(task_id)['status']} after {args.timeout:g} s")
                continue
            completed += task["status"] == "completed"
            print(f"\ntask {task_id}: {task['status']}"
                  + (f" ({task['error_message']})" if task.get("error_message") else ""))
            outputs = sorted((f for f in dev.list_files(task_id) if f["created_by"] == "agent"),
                             key=lambda f: f["filename"])
            for f in outputs:
                path = dev.download_file(f["id"], dest / task_id / safe_name(f["filename"]))
                print(f"  {f['filename']} ({f['size_bytes']} bytes)")
                for line in _first_lines(path):
                    print(f"  | {line}")
            if not outputs:
                print("  (no output files)")
    print()
    return 0 if completed == len(ids) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("service")
    p.add_argument("name")
    p.set_defaults(run=cmd_service)
    p = sub.add_parser("submit")
    p.add_argument("service_id")
    p.add_argument("ids_file")
    p.set_defaults(run=cmd_submit)
    p = sub.add_parser("results")
    p.add_argument("ids_file")
    p.add_argument("dest")
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(run=cmd_results)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl+C: demo.sh's trap cleans up; no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
