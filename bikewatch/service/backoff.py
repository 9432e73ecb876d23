"""Backoff while the output (or the CSV, or the inbox) is unusable: doubling waits, one error line.

Shared by delivery and recovery: while either waits for the output, nothing new is taken,
and the first failure is logged as an error, the retries only at debug level.
"""

from __future__ import annotations

from typing import Any

OUTPUT_UNAVAILABLE = "output unavailable; photos stay in the inbox, retrying"
"""The one error line of an outage (later retries say it at debug level)."""


class Backoff:
    """1 s, 2 s, 4 s ... up to ``max_seconds`` between retries; reset once the output works again."""

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.seconds = 0.0  # the current wait; 0 when nothing is failing
        self.until = 0.0  # monotonic time before which nothing new is taken

    @property
    def failing(self) -> bool:
        """Whether a failure is being waited out (the next one is then a retry's, logged at debug)."""
        return self.seconds > 0

    def fail(self, now: float, log: Any, **fields: Any) -> None:
        """The output failed: :meth:`block`, and say so (an error the first time, debug for each retry)."""
        first = not self.failing
        self.block(now)
        (log.error if first else log.debug)(OUTPUT_UNAVAILABLE, **fields, retry_in_s=self.seconds)

    def block(self, now: float) -> None:
        """A failure now: wait twice as long as last time before the next try."""
        self.seconds = min(self.max_seconds, max(1.0, self.seconds * 2))
        self.until = now + self.seconds

    def blocked(self, now: float) -> bool:
        return now < self.until

    def recovered(self) -> bool:
        """The output worked: True when it had been failing (say so once)."""
        was = self.failing
        self.seconds = 0.0
        return was
