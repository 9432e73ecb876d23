"""The receiving end of NOTIFY_SOCKET, for the tests and the benchmark (never the service)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable


class NotifyListener:
    """The receiving end of ``NOTIFY_SOCKET``, as systemd holds it.

    For the benchmark and the tests, which start a real ``bikewatch run`` and wait for
    its own ``READY=1`` instead of guessing how long start-up takes. A thread reads
    datagrams until :meth:`close` or until the ``alive`` callback says the service is
    gone (a full socket would block the service's sd_notify calls).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.messages: list[str] = []
        self.ready = threading.Event()
        self.ready_at: float | None = None  # time.monotonic() when READY=1 arrived
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.2)
        self._thread: threading.Thread | None = None

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    def start(self, alive: Callable[[], bool]) -> None:
        self._thread = threading.Thread(target=self._read, args=(alive,), name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self, alive: Callable[[], bool]) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                if not alive():
                    return
                continue
            except OSError:
                return  # closed
            text = data.decode(errors="replace")
            self.messages.append(text)
            if "READY=1" in text.split("\n") and not self.ready.is_set():
                self.ready_at = time.monotonic()
                self.ready.set()

    def close(self, timeout: float = 2.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()
