"""The exit codes of every ``bikewatch`` command, in one place (README: Commands)."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    """Done; for ``status``: a worker is running."""
    FAILED = 1
    """Some files could not be classified (``classify``, ``evaluate``)."""
    USAGE = 2
    """Bad arguments, a bad configuration, or a model that cannot be loaded."""
    NOT_RUNNING = 3
    """``status``: no worker is running."""
