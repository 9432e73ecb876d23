"""The inbox watcher alone: N files renamed into a watched inbox, until every one is hinted "done".

``python -m benchmarks.intakebench [N] [ROUNDS]`` (default 2000 files, 5 rounds). A child
process does the renames, as an uploader or ``./dev bench`` would; this process runs the
watcher and a consumer loop that stands in for the service's loop (a little work per
wake-up). Printed per round: the time from the start of the renames to the last "done"
hint, this process's CPU time over it, and how often the consumer woke up.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bikewatch.intake.hints import Hints
from bikewatch.intake.watcher import InboxWatcher

CONSUMER_WORK = 300
"""Empty loop turns per wake-up: the loop's own work (a few microseconds)."""


def one_round(n: int) -> tuple[float, float, int, int]:
    """(seconds, CPU seconds, done hints, wake-ups) for one burst of ``n`` renames."""
    with tempfile.TemporaryDirectory() as tmp:
        inbox, stage = Path(tmp) / "inbox", Path(tmp) / "stage"
        (inbox / ".bikewatch" / "work").mkdir(parents=True)
        stage.mkdir()
        for i in range(n):
            (stage / f"p{i:05}.jpg").write_bytes(b"x" * 100)
        hints = Hints()
        watcher = InboxWatcher(inbox, hints, inbox / ".bikewatch")
        watcher.start()
        try:
            script = f"import os\nfor i in range({n}): os.rename('{stage}/p%05d.jpg' % i, '{inbox}/p%05d.jpg' % i)"
            cpu0, t0 = time.process_time(), time.monotonic()
            child = subprocess.Popen([sys.executable, "-c", script])
            done: set[str] = set()
            wakes = 0
            while len(done) < n and time.monotonic() - t0 < 60:
                hints.wake.wait(1)
                _, closed, _ = hints.take()
                done |= closed
                wakes += 1
                for _ in range(CONSUMER_WORK):
                    pass
            seconds, cpu = time.monotonic() - t0, time.process_time() - cpu0
            child.wait()
        finally:
            watcher.stop()
    return seconds, cpu, len(done), wakes


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 2000
    rounds = int(argv[1]) if len(argv) > 1 else 5
    for _ in range(rounds):
        seconds, cpu, done, wakes = one_round(n)
        print(f"{done}/{n} done hints in {seconds * 1000:.0f} ms, watcher process CPU {cpu * 1000:.0f} ms, "
              f"{wakes} wake-ups")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
