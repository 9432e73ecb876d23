"""structlog set-up: JSON lines for journald and files, readable lines on a terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Any, Iterator, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """``fmt`` is auto, json or console; auto means console only when ``stream`` is a terminal."""
    stream = stream or sys.stdout
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        # A file name that is not UTF-8 (surrogate escapes) must never crash a log call, even
        # under a strict UTF-8 locale (LANG=en_US.UTF-8 under systemd): write it as "\udcff".
        reconfigure(errors="backslashreplace")
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if use_console
        else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not use_console:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (watchdog) go to stderr at warning level and above.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("bikewatch").bind(**bind)


@contextlib.contextmanager
def native_stderr_as_debug(event: str) -> Iterator[None]:
    """While the block runs, what native code writes to file descriptor 2 becomes debug records.

    Importing TensorFlow and looking for GPUs writes about seven lines straight to fd 2,
    past Python and past ``TF_CPP_MIN_LOG_LEVEL`` (absl logs everything before it is
    initialised): oneDNN notes, "Could not find cuda drivers" and, on every machine
    without a GPU, "E0000 ... failed call to cuInit". Under systemd they land in the
    journal as unstructured error lines at every start. They are kept, one ``event``
    record each at debug level (``log_level = "debug"`` shows them). Only for short,
    single-purpose blocks: other threads' writes to fd 2 are captured too.
    """
    log = get_logger()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    log.debug(event, line=line)
