"""``python -m benchmarks.threadcpu``: CPU per photo of each thread of a W^X daemon sorting a dump.

The rates of ``./dev bench`` say how fast; this says where the CPU goes. A real
``bikewatch run`` (under W^X where the kernel allows it, as ``./dev bench`` runs it) sorts
``--photos`` photos renamed into its inbox, and every thread's utime+stime over that run
is read from ``/proc/PID/task/TID/stat``, for the daemon and for its decode workers.

Python 3.11 gives its threads no OS-level names, so the daemon is started with a
``sitecustomize`` (on ``PYTHONPATH``, in a temporary folder; nothing in the package
changes) that writes each Python thread's native id and name as it starts. Threads
that are not Python's (LiteRT's XNNPACK pool) show as "native".
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

from benchmarks.bench import (
    Daemon, RowCounter, add_photo_arguments, log, measure_end_to_end, proc_cpu_seconds, process_tree, source_photos,
    stage_copies, wx_available,
)

SITECUSTOMIZE = '''
import os, sys, threading
if sys.orig_argv[1:4] == ["-m", "bikewatch", "run"] and os.environ.get("BW_THREAD_NAMES"):
    _out = open(os.environ["BW_THREAD_NAMES"], "a", buffering=1)
    _out.write(f"{os.getpid()}\\tmain\\n")
    _inner = threading.Thread._bootstrap_inner  # every thread passes here, whatever its run()
    def _bootstrap_inner(self):
        _out.write(f"{threading.get_native_id()}\\t{self.name}\\n")
        _inner(self)
    threading.Thread._bootstrap_inner = _bootstrap_inner
'''


def task_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` now (threads that ended are gone)."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(task)] = proc_cpu_seconds(pid, int(task))
        except OSError:
            continue
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="threadcpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=3000, help="photos in the dump (default 3000)")
    add_photo_arguments(parser)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bwthreads-"))
    daemon: Daemon | None = None
    try:
        photos, origin = source_photos(args, work)
        inbox, output = work / "inbox", work / "sorted"
        inbox.mkdir()
        site = work / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        names_file = work / "threads.tsv"
        staged = stage_copies(photos, work / "stage", args.photos, "p")
        os.sync()
        wx = wx_available() is None
        pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        daemon = Daemon(work, {"inbox": str(inbox), "output": str(output), "log_format": "json",
                               "worker_name": "threadcpu"}, wx=wx,
                        env={"PYTHONPATH": pythonpath, "BW_THREAD_NAMES": str(names_file)})
        daemon.start()
        log(f"{args.photos} photos from {origin}; daemon {'under W^X' if wx else 'unrestricted'}")
        time.sleep(1.0)  # start-up work is over
        pids = process_tree(daemon.pid)  # the daemon first, then its decode workers
        before = {p: task_cpu(p) for p in pids}
        counter = RowCounter(output / "classifications.csv")
        wall = measure_end_to_end(daemon, counter, staged, inbox)["seconds"]
        after = {p: task_cpu(p) for p in pids}
        names: dict[int, str] = {}
        for line in names_file.read_text().splitlines():
            native_id, _, name = line.partition("\t")
            names[int(native_id)] = name
        rows = []
        for p in pids:
            for tid, cpu in after[p].items():
                spent = cpu - before[p].get(tid, 0.0)
                if p != daemon.pid:  # a decode worker, or multiprocessing's resource tracker
                    who = f"child process {p}" + ("" if tid == p else f", thread {tid}")
                else:
                    who = names.get(tid, "native (LiteRT's XNNPACK pool)")
                rows.append((spent, who))
        total = sum(r[0] for r in rows)
        print(f"threadcpu: {args.photos} photos in {wall:.2f} s ({args.photos / wall:.0f}/s), "
              f"daemon {'W^X' if wx else 'open'}; {total / wall:.2f} cores")
        print(f"  {'thread':34} {'CPU s':>7} {'ms/photo':>9}")
        for spent, who in sorted(rows, reverse=True):  # idle ones too: every thread the daemon runs
            print(f"  {who[:34]:34} {spent:7.2f} {spent / args.photos * 1000:9.3f}")
        print(f"  {'all':34} {total:7.2f} {total / args.photos * 1000:9.3f}")
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
