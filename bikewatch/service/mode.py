"""What a run of the loop is for: the daemon (watch for ever) or ``bikewatch sort`` (drain once).

The loop asks the mode its questions by name instead of testing a one-shot flag in each place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    watch: bool
    """Watch the inbox (events, periodic rescans, dead workers found at a rescan); else only the start-up scan."""
    read_ahead: bool
    """Read and classify files while they settle (a dump found at once has nothing to overlap with)."""
    complete_after: float | None
    """A file that has sat still this long at the start-up scan is complete (a dump): no settle wait."""
    stop_when_drained: bool
    """Return once nothing is waiting, in flight or owed."""

    @classmethod
    def daemon(cls) -> Mode:
        return cls(watch=True, read_ahead=True, complete_after=None, stop_when_drained=False)

    @classmethod
    def drain(cls, settle_seconds: float) -> Mode:
        """``bikewatch sort``: what is in the folder now, then return."""
        return cls(watch=False, read_ahead=False, complete_after=settle_seconds, stop_when_drained=True)
