"""Signal handling that cannot deadlock.

A Python signal handler runs in the main thread between two bytecodes, possibly
while that very thread holds a lock: structlog's write lock in the middle of a
log line, or the condition lock inside a ``threading.Event``. A handler that
logs or sets an Event then waits for a lock its own thread holds, for ever; the
service hung on SIGTERM that way (seen once in about 20 test runs). So the
handler here only writes the signal number to a pipe, which takes no lock, and
a thread of its own reads it and does the real work, where waiting for a lock
is harmless.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Callable

Handler = Callable[[int], None]


class SignalRelay:
    """Run ``handlers[signum](signum)`` on a relay thread for each signal received."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self._handlers = dict(handlers)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)  # a full pipe must never block the main thread
        self._previous: dict[int, object] = {}
        self._thread = threading.Thread(target=self._run, name="signals", daemon=True)

    def install(self) -> "SignalRelay":
        """Start the relay thread and install the handlers (main thread only, like signal.signal)."""
        self._thread.start()
        for signum in self._handlers:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        try:
            os.write(self._write_fd, bytes([signum]))
        except OSError:  # full (hundreds of unread signals) or closed: nothing more to say
            pass

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return  # closed
            for signum in data:
                self._handlers[signum](signum)

    def close(self) -> None:
        """Put the previous handlers back and stop the relay thread."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()
        os.close(self._write_fd)
        self._thread.join(timeout=5)
        os.close(self._read_fd)
