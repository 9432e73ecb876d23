"""Minimal, dependency-free client for the systemd ``sd_notify`` protocol.

Why this exists instead of ``python-systemd`` / ``sdnotify``: the protocol is
a handful of newline-separated ``KEY=VALUE`` lines sent as one datagram to the
AF_UNIX socket named in ``$NOTIFY_SOCKET`` (see sd_notify(3)); it is not worth
a C extension or another dependency, and owning it lets us guarantee that a
notification failure can never take the service down.

Typical use from the daemon (the watchdog ping must come from the processing
loop itself, so a wedged loop stops pinging and systemd restarts us)::

    notifier = Notifier.from_environ()
    notifier.extend_timeout(120)            # before a slow model load
    model = load_model()
    notifier.ready(status="watching /srv/bikewatch/inbox")
    while running:
        notifier.maybe_ping_watchdog()      # cheap; sends at most every interval/2
        process_one_batch()
        notifier.status(format_status({...}))
    notifier.stopping()

This module only uses the standard library and never starts threads.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from types import TracebackType
from typing import Final

__all__ = ["Notifier", "format_status", "write_execute_denied", "adapt_tensorflow_to_wx"]

log = logging.getLogger(__name__)

#: Retry a failed watchdog ping after this many seconds (capped at the ping
#: interval) rather than waiting a whole interval, because one lost ping plus a
#: full wait would already exceed WatchdogSec.
_WATCHDOG_RETRY_S: Final = 1.0


def _parse_positive_int(value: str | None) -> int | None:
    """Parse an env var as a positive int; ``None`` for missing/garbage (as libsystemd does)."""
    if value is None:
        return None
    try:
        number = int(value.strip(), 10)
    except ValueError:
        return None
    return number if number > 0 else None


def _one_line(text: str) -> str:
    """Keep a value on one line: a newline would start a new (bogus) assignment."""
    return text.replace("\r", " ").replace("\n", " ")


class Notifier:
    """Sends sd_notify messages to systemd; a silent no-op when not run under systemd.

    Construct it with :meth:`from_environ`. All ``send``-style methods return
    ``True`` if the datagram was handed to the kernel and ``False`` otherwise
    (disabled notifier or socket error). Errors are logged, never raised: the
    photo sorter must keep working even if the notify socket is gone.
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a notifier for ``address`` (already decoded; ``'\\0…'`` = abstract).

        ``watchdog_usec`` is the *already validated* WatchdogSec in µs (use
        :meth:`from_environ` to get WATCHDOG_PID handling). ``clock`` is
        injectable only so callers can share one monotonic time source.
        """
        self._address = address
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._clock = clock
        self._sock: socket.socket | None = None
        self._last_ping: float | None = None
        self._last_attempt: float | None = None
        self._last_attempt_failed = False
        self._failing = False

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build a notifier from ``NOTIFY_SOCKET``/``WATCHDOG_USEC``/``WATCHDOG_PID``.

        Mirrors libsystemd: ``@name`` means an abstract socket, an absolute path
        a filesystem socket; anything else (unset, empty, relative, or the
        ``vsock:`` form of systemd >= 254) yields a disabled notifier.
        The watchdog is only honoured when ``WATCHDOG_PID`` is absent or equals
        our PID, because the variables are inherited by child processes that
        must not think they own the service's watchdog.
        """
        raw = environ.get("NOTIFY_SOCKET", "")
        address: str | None
        if raw.startswith("@"):
            address = "\0" + raw[1:]
        elif raw.startswith("/"):
            address = raw
        else:
            if raw:
                log.warning("unsupported NOTIFY_SOCKET address, notifications disabled: %r", raw)
            address = None

        watchdog_usec = _parse_positive_int(environ.get("WATCHDOG_USEC"))
        pid_raw = environ.get("WATCHDOG_PID")
        if watchdog_usec is not None and pid_raw is not None:
            if _parse_positive_int(pid_raw) != os.getpid():
                watchdog_usec = None
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        """Whether messages are actually sent (i.e. we run under a notify-aware manager)."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec, as sd_watchdog_enabled(3) advises), or None."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    # ------------------------------------------------------------- messages
    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one datagram; the generic primitive."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            # Log the first failure loudly and the rest quietly, so a missing
            # socket does not flood the journal from the per-iteration ping.
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "sd_notify to %r failed: %s", self._printable_address, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("sd_notify to %r works again", self._printable_address)
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (Type=notify): unblocks ``systemctl start``."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Set the free-form line shown by ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        """Announce a clean shutdown has begun so systemd does not treat the exit as a crash."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """Announce a config reload; send :meth:`ready` when done.

        MONOTONIC_USEC is included because systemd >= 253 (Type=notify-reload)
        requires it; older managers ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start/stop timeout fires.

        Used around the model load, whose duration depends on disk and
        hardware; keeps TimeoutStartSec short for the common case.
        """
        usec = max(0, int(seconds * 1_000_000))
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    # ------------------------------------------------------------- watchdog
    def ping_watchdog(self) -> bool:
        """Send WATCHDOG=1 unconditionally (prefer :meth:`maybe_ping_watchdog` in loops)."""
        return self.notify("WATCHDOG=1")

    def maybe_ping_watchdog(self, now: float | None = None) -> bool:
        """Ping the watchdog if at least :attr:`watchdog_interval` passed since the last ping.

        Cheap enough to call on every loop iteration (one clock read and a
        comparison when nothing is due). Returns True only when a ping was
        sent successfully. Must be called from the processing loop, not a
        helper thread, so that a hung loop stops pinging.
        """
        interval = self.watchdog_interval
        if interval is None:
            return False
        if now is None:
            now = self._clock()
        if self._last_ping is not None and now - self._last_ping < interval:
            return False
        if self._last_attempt_failed and self._last_attempt is not None:
            # back off a little instead of retrying (and logging) every iteration
            if now - self._last_attempt < min(_WATCHDOG_RETRY_S, interval):
                return False
        self._last_attempt = now
        sent = self.ping_watchdog()
        self._last_attempt_failed = not sent
        if sent:
            self._last_ping = now
        return sent

    # ------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Close the socket (optional; it is also close-on-exec)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Notifier(address={self._printable_address!r}, watchdog_interval={self.watchdog_interval!r})"

    @property
    def _printable_address(self) -> str | None:
        if self._address is None:
            return None
        return "@" + self._address[1:] if self._address.startswith("\0") else self._address


def format_status(counts: Mapping[str, int | Mapping[str, int]]) -> str:
    """Render counters as a one-line STATUS text, in the mapping's order.

    A plain int renders as ``"name N"``; a nested mapping renders as its total
    followed by the parts, so the daemon decides the grouping, e.g.::

        >>> format_status({"sorted": {"mountain": 7, "road": 5}, "rejected": 1, "waiting": 3})
        'sorted 12 (mountain 7, road 5), rejected 1, waiting 3'

    Kept pure (no I/O) so it is trivially testable and reusable for log lines.
    """
    parts: list[str] = []
    for name, value in counts.items():
        label = _one_line(str(name))
        if isinstance(value, Mapping):
            inner = ", ".join(f"{_one_line(str(k))} {int(v)}" for k, v in value.items())
            total = sum(int(v) for v in value.values())
            parts.append(f"{label} {total} ({inner})" if inner else f"{label} {total}")
        else:
            parts.append(f"{label} {int(value)}")
    return ", ".join(parts)


def write_execute_denied() -> bool:
    """Return True if this process may not create writable+executable memory.

    That is the case under systemd's MemoryDenyWriteExecute=yes (seccomp in
    systemd <= 253, prctl(PR_SET_MDWE) from 254 on) and under SELinux
    deny_execmem. Probed by mapping (and immediately unmapping) one anonymous
    W+X page: cheap, and it tests the exact thing a JIT needs.
    """
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return True
    page.close()
    return False


def adapt_tensorflow_to_wx(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Under W^X, turn off TensorFlow's oneDNN JIT rewrite; returns True if it did.

    With oneDNN opts on, every Conv2D fails under W^X ("could not create a
    primitive") - the service would reject every photo. With
    TF_ENABLE_ONEDNN_OPTS=0 TensorFlow runs Eigen kernels and oneDNN's
    non-JIT GEMM: same results, slower (see docs/systemd.md). Must run
    before ``import tensorflow``. A no-op when W+X memory is allowed, so an
    explicit TF_ENABLE_ONEDNN_OPTS=1 is honoured wherever it can work.
    """
    if not write_execute_denied():
        return False
    if environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
        log.warning(
            "writable+executable memory is denied (MemoryDenyWriteExecute=yes?): "
            "setting TF_ENABLE_ONEDNN_OPTS=0, oneDNN's JIT cannot work here"
        )
        environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    return True
