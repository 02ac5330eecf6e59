#!/usr/bin/env python3
"""The demo's executor: scripts/demo.sh builds it into agent-core-demo/executor:latest as ENTRYPOINT.

For each input file it writes output/<local name>.report.md (size, lines, words, first
lines), and output/summary.md with the task's prompts and a table of the inputs. It reads
only task.json and input/, writes only output/ (flat: no folders to clean up), and needs
nothing but the Python standard library. See executor-example/README.md for the contract.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WORKSPACE = Path("/workspace")
FIRST_LINES = 3
LINE_CHARS = 80


def describe(path: Path) -> dict:
    data = path.read_bytes()
    if b"\0" in data:
        return {"size": len(data), "lines": None, "words": None, "first": ["(binary file)"]}
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines()
    first = [line[:LINE_CHARS] + ("…" if len(line) > LINE_CHARS else "") for line in lines[:FIRST_LINES]]
    return {"size": len(data), "lines": len(lines), "words": len(text.split()), "first": first}


def report(name: str, local_path: str, info: dict) -> str:
    counts = f"{info['size']} bytes"
    if info["lines"] is not None:
        counts += f", {info['lines']} lines, {info['words']} words"
    lines = [f"# {name}", f"{counts} ({local_path}); first lines:", ""]
    lines += [f"    {line}" for line in info["first"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    task = json.loads((WORKSPACE / "task.json").read_text(encoding="utf-8"))
    out = WORKSPACE / "output"
    rows = []
    for item in task.get("input_files") or []:
        local = item["local_path"]  # sanitised by the agent; the client's name is item["filename"]
        info = describe(WORKSPACE / local)
        (out / f"{Path(local).name}.report.md").write_text(report(item["filename"], local, info), encoding="utf-8")
        words = "-" if info["words"] is None else info["words"]
        rows.append(f"| {item['filename']} | {info['size']} | {words} |")
    summary = [f"# {task['task_prompt']}", f"Task {task['task_id']}: {len(rows)} input file(s)."]
    if task.get("output_prompt"):
        summary.append(f"Output prompt: {task['output_prompt']}")
    summary += ["", "| file | bytes | words |", "|---|---|---|", *rows, ""]
    (out / "summary.md").write_text("\n".join(summary), encoding="utf-8")
    print(f"task {os.environ.get('TASK_ID', '?')}: wrote summary.md and {len(rows)} report(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
