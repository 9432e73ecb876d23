"""structlog set-up: JSON lines for journald and files, readable lines on a terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Any, Iterator, TextIO

import structlog
from structlog.typing import EventDict

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """``fmt`` is auto, json or console; auto means console only when ``stream`` is a terminal.

    structlog's own records and the standard library's (watchdog's, TensorFlow's, Python
    warnings) go to ``stream`` in the same format, so that under systemd every journal line
    of the service is one JSON object. Calling it again replaces the earlier set-up.
    """
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
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # JSON carries a traceback as one string; the console renderer prints it itself.
    tracebacks: list[Any] = [] if use_console else [structlog.processors.format_exc_info]
    threshold = _LEVELS.get(level, logging.INFO)
    structlog.configure(
        processors=[*shared, *tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, _strip_event, *tracebacks],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    _route_stdlib(stream, formatter, max(threshold, logging.WARNING))


class _StdlibHandler(logging.StreamHandler[TextIO]):
    """The root handler :func:`configure` installs; its type tells it apart from others' (pytest's)."""


def _strip_event(_logger: Any, _method: str, event: EventDict) -> EventDict:
    """A stdlib message may end in a newline (a Python warning always does); a log line does not."""
    if isinstance(event.get("event"), str):
        event["event"] = event["event"].rstrip()
    return event


def _route_stdlib(stream: TextIO, formatter: logging.Formatter, level: int) -> None:
    """Standard-library records at ``level`` and above (libraries' info chatter stays out) to ``stream``."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    handler = _StdlibHandler(stream)
    handler.setFormatter(formatter)
    handler.setLevel(level)
    root.addHandler(handler)
    # The root logger stays at warning whatever ``level`` is: handlers of their own on a library's
    # logger (the intake's watchdog overflow detector) still see its warnings at log_level = "error".
    root.setLevel(logging.WARNING)
    # warnings.warn() becomes a "py.warnings" record, rendered the same way. Off first: captureWarnings(True)
    # does nothing when it was on before, even if something (warnings.catch_warnings) has since put its
    # own warnings.showwarning back.
    logging.captureWarnings(False)
    logging.captureWarnings(True)


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
