"""The exit codes of every ``bikewatch`` command, in one place (README: Commands)."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    """Done; for ``status``: a worker is running; for ``run``: stopped cleanly (SIGTERM, SIGINT)."""
    FAILED = 1
    """Some files could not be classified (``classify``) or were left in the folder (``sort``),
    or the service stopped on an error (``run``)."""
    USAGE = 2
    """Bad arguments, a bad configuration, a missing input, or a model that cannot be loaded."""
    NOT_RUNNING = 3
    """``status``: no worker is running (also when only a dead worker's stale status file is left)."""
    INTERRUPTED = 130
    """Ctrl-C in a command other than ``run`` (128 + SIGINT, as a shell reports it)."""
    BROKEN_PIPE = 141
    """The reader of stdout left (``bikewatch status | head -1``): 128 + SIGPIPE, as a shell reports it."""
