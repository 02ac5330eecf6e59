"""A stand-in daemon for `stop` tests: holds the pidfile, writes status.json and walks the ladder on SIGTERM
like the scheduler, recording each signal; it leaves `exit_after` seconds after the first one.

python -m tests.fake_daemon DATA_DIR EXIT_AFTER
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from agent_core import process
from agent_core.lifecycle import Step
from agent_core.livestatus import LiveStatus, TaskEntry

STEPS = tuple(Step)


def main() -> None:
    data_dir, exit_after = Path(sys.argv[1]), float(sys.argv[2])
    pidfile = process.PidFile(data_dir)
    pidfile.acquire()
    state = {"step": 0, "requested": None}
    stopping = threading.Event()

    def write() -> None:
        now = time.time()
        process.write_status(data_dir, LiveStatus(
            pid=os.getpid(), state=STEPS[state["step"]], stop_requested_at=state["requested"],
            tasks=(TaskEntry(id="t-1", stage="running", started_at=now - 30, stage_since=now - 5,
                             container="abc"),)).to_json())

    def on_term(_signum: int, _frame: object) -> None:
        state["step"] = min(state["step"] + 1, len(STEPS) - 1)
        state["requested"] = state["requested"] or time.time()
        with open(data_dir / "signals", "a") as f:
            f.write(f"{STEPS[state['step']].state}\n")
        write()
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    write()
    stopping.wait()
    time.sleep(exit_after)
    (data_dir / process.STATUSFILE).unlink(missing_ok=True)
    pidfile.release()


if __name__ == "__main__":
    main()
