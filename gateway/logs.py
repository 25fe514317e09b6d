"""Where the process's log lines go and in what shape: text, or ECS JSON (one per line).

JSON lines follow the Elastic Common Schema, written by Elastic's ``ecs-logging`` formatter:
``@timestamp``, ``log.level``, ``message``, ``ecs.version``, ``log.logger``, ``log.origin``,
``process.pid``, and for an exception ``error.type``, ``error.message`` and the whole
traceback in ``error.stack_trace``. A line about a request also carries ``trace.id`` and
``span.id`` when tracing is on. The access line's fields are built by ``accesslog``.

With JSON, nothing the process writes to stderr is left as plain text: Python warnings,
uncaught exceptions (also in threads) and start-up errors are log records too.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

import ecs_logging

if TYPE_CHECKING:
    from gateway.accesslog import LineWriter
    from gateway.proxy import Exchange
    from gateway.tracing import RequestTrace

# The request whose task is running (tracing.RequestTrace.within), for its log lines' ids.
CURRENT_TRACE: ContextVar[RequestTrace | None] = ContextVar("gateway_trace", default=None)

# The running loop or None, without raising (asyncio exports it for loop libraries:
# asyncio.events.__all__).
running_loop = asyncio._get_running_loop

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TEXT_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # and ",mmm": logging's default %(asctime)s, local time


class EcsFormatter(ecs_logging.StdlibFormatter):
    """ecs-logging's formatter; the access line's fields come ready-made, and trace ids."""

    def __init__(self) -> None:
        # log.original would repeat the message.
        super().__init__(exclude_fields=("log.original",), ensure_ascii=False)

    def format_to_ecs(self, record: logging.LogRecord) -> dict[str, Any]:
        access = record.__dict__.get("access")
        if access is not None:
            # The hot one: no walk over the record's attributes, no dotted-key merging.
            out: dict[str, Any] = access
            out["@timestamp"] = _timestamp(record.created)
            out["log"] = {"level": "info", "logger": record.name}
            out["message"] = record.getMessage()
            out["ecs.version"] = ecs_logging.ECS_VERSION
            return out
        result: dict[str, Any] = super().format_to_ecs(record)
        if "trace" not in result:
            ids = _current_trace_ids()
            if ids is not None:
                result["trace"] = {"id": ids[0]}
                result["span"] = {"id": ids[1]}
        return result


def _timestamp(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def _current_trace_ids() -> tuple[str, str] | None:
    """The ids of the request being handled in this context (the full path sets it).

    A pooled upstream connection opened during a request keeps that context in its
    callbacks; once the request has ended its ids are not used again.
    """
    trace = CURRENT_TRACE.get()
    if trace is None or trace.ended:
        return None
    return trace.ids()


def log_fields(ex: Exchange) -> dict[str, str]:
    """``extra=`` for a log line about a request outside its task: its trace and span ids."""
    trace = ex.trace
    ids = trace.ids() if trace is not None else None
    if ids is None:
        return {}
    return {"trace.id": ids[0], "span.id": ids[1]}


def json_logging() -> bool:
    """Is the root logger writing ECS JSON (``--log-format json``)?"""
    return any(isinstance(h.formatter, EcsFormatter) for h in logging.getLogger().handlers)


class _ProcessHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``setup_logging`` installs. The access log writes to its stream's file
    descriptor itself, in the same shape (gateway/accesslog.py), through ``lines``; so does
    every other record logged from a thread running an event loop: the writer never waits,
    and a destination that does not keep up (a full pipe nobody reads, a stopped terminal)
    loses lines, counted, rather than stalling the loop and every request with it. Such a
    record is written at once (its level may be a warning an operator is waiting for), the
    access lines before it with it. Other threads (start-up, shutdown, background exporters,
    a second loop's thread) write to the stream as ``logging`` does, and may wait: they hold
    up no request."""

    def __init__(self, stream: TextIO, fmt: str) -> None:
        super().__init__(stream)
        self.shape = fmt
        self.lines: LineWriter | None = None  # the writer to this stream's descriptor

    def fileno(self) -> int:
        self.flush()  # what was logged before goes out first
        fd: int = self.stream.fileno()
        return fd

    def writer(self) -> LineWriter | None:
        """The writer to the stream's file descriptor (made at first use; anew when the
        stream was replaced), or None when the stream has none."""
        from gateway.accesslog import LineWriter  # (it builds on this module)

        try:
            fd = self.fileno()
        except (AttributeError, OSError, ValueError):
            return None
        if self.lines is None or self.lines.target != fd:
            self.lines = LineWriter(fd)
        return self.lines

    def emit(self, record: logging.LogRecord) -> None:
        writer = self.writer() if running_loop() is not None else None
        # (The writer is the loop thread's alone: the access log adds to it without a lock.)
        if writer is None or writer.owner != threading.get_ident():
            super().emit(record)
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        writer.write_now(line + "\n")


def access_destination(logger: logging.Logger) -> _ProcessHandler | None:
    """The handler ``logger``'s lines all go to when it is the process's log stream as
    ``setup_logging`` made it; None when logging was set up otherwise (an application
    embedding the gateway, a test capturing records): then they go through ``logging``."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        handlers.extend(current.handlers)
        current = current.parent if current.propagate else None
    if len(handlers) != 1 or not isinstance(handlers[0], _ProcessHandler):
        return None
    return handlers[0]


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = _ProcessHandler(sys.stderr, fmt)
    if fmt == "json":
        handler.setFormatter(EcsFormatter())
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    if fmt == "json":
        sys.excepthook = _uncaught
        threading.excepthook = _uncaught_in_thread


def _uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("gateway").critical("uncaught exception: %s", kind.__name__,
                                          exc_info=(kind, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("gateway").critical(
        "uncaught exception in thread %s: %s", name, args.exc_type.__name__,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
