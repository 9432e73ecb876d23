"""A real ``bikewatch run`` child process on temporary folders, for end-to-end tests.

The harness binds a real AF_UNIX datagram socket as ``NOTIFY_SOCKET``, so a
test waits for the service's own ``READY=1`` instead of sleeping, and polls
the disk with deadlines instead of guessing how long things take.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from benchmarks.bench import toml_value  # one TOML writer for the bench's daemon and the tests'
from bikewatch.intake.hints import Hints
from bikewatch.testing.notify import NotifyListener  # one NOTIFY_SOCKET receiver for them too

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class Daemon:
    """One ``bikewatch run`` child; ``settings`` become its TOML config file."""

    def __init__(self, root: Path, *, name: str = "daemon", inbox: Path | None = None, output: Path | None = None,
                 settings: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 args: Iterable[str] = (), wrap: Iterable[str] = ()) -> None:
        self.root = root
        self.name = name
        self.inbox = inbox or root / "inbox"
        self.output = output or root / "sorted"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.config = root / f"{name}.toml"
        base = {"inbox": str(self.inbox), "output": str(self.output), "settle_seconds": 0.3,
                "log_format": "json", "worker_name": name}
        base.update(settings or {})
        self.config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in base.items()))
        self.env = env or {}
        self.args = list(args)
        self.wrap = list(wrap)  # a command that execs the rest in place (same pid), e.g. a UTS namespace
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.notifications: list[str] = []
        self._listener: NotifyListener | None = None
        self._threads: list[threading.Thread] = []

    @property
    def log_path(self) -> Path:
        return self.output / "classifications.csv"

    def start(self, *, wait_ready: bool = True, timeout: float = 90.0) -> "Daemon":
        self._listener = NotifyListener(self.root / f"{self.name}.notify")
        env = {**os.environ, **self._listener.env(), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", **self.env}
        if "WATCHDOG_USEC" not in self.env:
            env.pop("WATCHDOG_USEC", None)
        self.lines = []
        self.notifications = self._listener.messages
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "bikewatch", "run", "--config", str(self.config), *self.args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            encoding="utf-8", errors="replace",
        )
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True)]
        self._threads[0].start()
        self._listener.start(lambda: self.proc is not None and self.proc.poll() is None)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _read_stdout(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before READY:\n{self.output_text()}")
            return self._listener is not None and self._listener.ready.is_set()

        wait_until(ready, timeout, what=f"{self.name} READY=1")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (name is None or record.get("event") == name):
                out.append(record)
        return out

    def output_text(self) -> str:
        return "\n".join(self.lines[-80:])

    def rows(self) -> list[dict[str, str]]:
        return read_csv(self.log_path)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def terminate(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.wait(10)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout=2)
        if self._listener:
            self._listener.close()
        return code

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._listener:
            self._listener.close()


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def files_under(folder: Path) -> list[Path]:
    """Regular files and links, excluding bikewatch's own state and the CSV."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".bikewatch"]
        for f in files:
            p = Path(root) / f
            if p.name == "classifications.csv":
                continue
            out.append(p)
    return sorted(out)


def fill_up(folder: Path) -> Path:
    """Fill ``folder``'s filesystem (a small tmpfs) with one file; returns it (unlink it to make room)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # full
    finally:
        os.close(fd)
    return filler


def collect(hints: Hints, until: Callable[[set[str], set[str], bool], bool],
            timeout: float = 10.0) -> tuple[set[str], set[str], bool]:
    """Gather a watcher's hints until ``until(paths, closed, rescan)`` holds; fail after ``timeout`` seconds."""
    paths: set[str] = set()
    closed: set[str] = set()
    rescan = False
    deadline = time.monotonic() + timeout
    while not until(paths, closed, rescan):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no such hints within {timeout}s: paths={paths} closed={closed} rescan={rescan}")
        hints.wake.wait(left)
        p, c, r = hints.take()
        paths |= p
        closed |= c
        rescan |= r
    return paths, closed, rescan
