"""One access-log line per request, written the way nginx writes its own: cheaply.

With ``--log-format json`` the line is an ECS document, the same fields ``gateway/logs.py``
gives every other line (``@timestamp``, ``log.level``, ``message``, ``ecs.version``,
``log.logger``); the request's are built here from values already at hand, named as in the
Elastic Common Schema, with the gateway's own facts under ``gateway.*``. With the text
format the same facts make one nginx-like line after logging's usual prefix.

When the process logs to a stream (``setup_logging``: stderr, or whatever file descriptor
that stream is), a line is serialised in one call and handed to a ``LineWriter``: lines are
batched once per event-loop iteration (or sooner by size) and written by a thread, so a
slow or stopped reader of the log never stalls a request: past ``pending_limit`` bytes
waiting, lines are dropped and counted (``gateway_access_log_dropped_total``). What is
pending is written at exit, SIGTERM included, for up to a second. When logging was set up
otherwise (an application embedding the gateway, a test capturing records), the line is a
``logging`` record on ``gateway.access`` carrying the same fields in ``access``.

Never logged: query strings, cookies, tokens, Authorization, or any header value except two
that every proxy's access log carries, each cleaned first: ``User-Agent`` (printable ASCII,
at most 256 characters, others replaced by ``?``) and ``Host`` (only when it is a well-formed
host name or address with an optional port; otherwise left out). The path is logged without
its query string because integrators put tokens there.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import select
import stat
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import ecs_logging

from gateway.logs import TEXT_TIME_FORMAT, access_destination

if TYPE_CHECKING:
    from gateway.proxy import Exchange
    from gateway.routing import CompiledRoute

access_logger = logging.getLogger("gateway.access")

_UA_MAX = 256
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9_.-]{1,253})(?::\d{1,5})?")


def clean_user_agent(value: str | None) -> str | None:
    """The User-Agent as logged: printable ASCII, no quotes or backslashes, 256 at most."""
    if not value:
        return None
    return _UNSAFE.sub("?", value[:_UA_MAX])


def clean_host(value: str | None) -> str | None:
    """The Host header as logged, lower-case, or None unless it is a well-formed host."""
    if not value or len(value) > 261 or not _HOST.fullmatch(value):
        return None
    return value.lower()


def split_host(host: str) -> tuple[str, int | None]:
    """``example.com:8443`` -> (``example.com``, 8443); ``[::1]`` -> (``::1``, None)."""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and (not name.startswith("[") or name.endswith("]")):
        return name.strip("[]"), int(port)
    return host.strip("[]"), None


def tls_version(ex: Exchange) -> str | None:
    """``1.3`` for a TLS 1.3 client connection, None for plain HTTP."""
    transport = ex.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    version: str | None = ssl_object.version()  # "TLSv1.3"
    return version.removeprefix("TLSv") if version else None


class LineWriter:
    """Whole lines to a file descriptor, batched, from a thread, never blocking the loop.

    The loop thread appends lines; once per loop iteration (or when ``batch`` bytes are
    waiting) they are joined into one chunk for the writer thread. A chunk that would put
    more than ``pending_limit`` bytes in waiting is dropped and its lines counted. The
    thread writes pipes and sockets in pieces of at most PIPE_BUF bytes ending at a line
    end, so that the lines of several workers sharing the stream never interleave.
    """

    def __init__(self, fd: int, *, pending_limit: int = 1 << 20, batch: int = 64 << 10,
                 exit_timeout: float = 1.0) -> None:
        self.fd = fd
        self.pending_limit = pending_limit
        self.batch = batch
        self.exit_timeout = exit_timeout
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        self._piece = (select.PIPE_BUF if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
                       else 0)
        self._lines: list[str] = []
        self._size = 0
        self._scheduled = False
        self._chunks: deque[bytes | None] = deque()
        # Each counter has one writer, so neither thread needs a lock to update it.
        self._queued = 0  # bytes handed to the thread (loop thread)
        self._written = 0  # of those, bytes done with (writer thread)
        self._dropped_full = 0  # lines dropped because too much was waiting (loop thread)
        self._dropped_failed = 0  # lines the destination refused (writer thread)
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gateway-access-log",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @property
    def dropped(self) -> int:
        return self._dropped_full + self._dropped_failed

    def add(self, line: str) -> None:
        """Queue one line (ending in a newline); it is written within this loop iteration."""
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.batch:
            self.flush()
        elif not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            loop.call_soon(self.flush)
            self._scheduled = True

    def flush(self) -> None:
        """Hand what the loop collected to the writer thread, or drop it if too much waits."""
        self._scheduled = False
        lines = self._lines
        if not lines:
            return
        self._lines = []
        self._size = 0
        data = "".join(lines).encode("utf-8", "backslashreplace")
        if self._closed or self._queued + len(data) - self._written > self.pending_limit:
            self._dropped_full += len(lines)
            return
        self._queued += len(data)
        self._chunks.append(data)
        self._wake.set()

    def close(self) -> None:
        """Write what is pending, waiting at most ``exit_timeout`` for the destination."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._chunks.append(None)
        self._wake.set()
        self._thread.join(self.exit_timeout)
        atexit.unregister(self.close)

    def _run(self) -> None:
        chunks = self._chunks
        while True:
            self._wake.wait()
            self._wake.clear()
            while chunks:
                item = chunks.popleft()
                if item is None:
                    return
                data = item
                self._write(data)
                self._written += len(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        piece = self._piece
        while view:
            end = len(view)
            if piece and end > piece:
                cut = data.rfind(b"\n", len(data) - len(view), len(data) - len(view) + piece)
                end = cut + 1 - (len(data) - len(view)) if cut >= 0 else end
            try:
                done = os.write(self.fd, view[:end])
            except BlockingIOError:  # someone made the descriptor non-blocking
                select.select([], [self.fd], [], 1.0)
                continue
            except OSError:
                # Gone (EPIPE, ENOSPC...): what was not written is lost, and counted.
                self._dropped_failed += bytes(view).count(b"\n")
                return
            view = view[done:]


def process_writer() -> LineWriter | None:
    """The writer to the process's log stream, or None when logging is not a stream."""
    handler = access_destination(access_logger)
    if handler is None:
        return None
    try:
        fd = handler.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    if handler.lines is None or handler.lines.fd != fd:
        handler.lines = LineWriter(fd)
    return handler.lines


def dropped_lines() -> int:
    """Access lines dropped by this process because the log could not keep up."""
    handler = access_destination(access_logger)
    return handler.lines.dropped if handler is not None and handler.lines is not None else 0


class _Clock:
    """The line's timestamps, the date part formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._utc = ""
        self._local = ""

    def stamps(self) -> tuple[str, str]:
        """(ECS ``@timestamp``, logging's ``%(asctime)s``) for now."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._utc = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._local = time.strftime(TEXT_TIME_FORMAT, time.localtime(second))
        ms = int((now - second) * 1000)
        return f"{self._utc}{ms:03d}Z", f"{self._local},{ms:03d}"


# The C encoder: no indent, no sort_keys (the dicts are built in ECS's sorted key order).
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_LOGGER_FIELD = {"logger": access_logger.name}


class AccessLog:
    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        handler = access_destination(access_logger) if enabled else None
        self._writer = process_writer() if handler is not None else None
        self._json = self._writer is not None and handler is not None and handler.shape == "json"
        self._clock = _Clock()

    def log_exchange(self, client_ip: str, request_id: str, method: str, raw_path: str,
                     minor: int, status: int, route: CompiledRoute | None, ex: Exchange,
                     duration: float) -> None:
        if not self.enabled or not access_logger.isEnabledFor(logging.INFO):
            return
        path = raw_path.partition("?")[0]
        headers = ex.headers
        user_agent = clean_user_agent(headers.get("User-Agent")) if headers is not None else None
        host = clean_host(headers.get("Host")) if headers is not None else None
        tls = tls_version(ex)
        trace = ex.trace
        ids = trace.ids() if trace is not None else None
        message = (
            f"{client_ip} {method} {path} HTTP/1.{minor} {status} {ex.bytes_in}/{ex.bytes_out} "
            f"{duration * 1000:.1f}ms host={host or '-'} ua=\"{user_agent or '-'}\" "
            f"tls={tls or '-'} route={route.name if route else None} "
            f"upstream={ex.upstream_status or '-'}"
            f"{'@' + route.upstream.host_header if route else ''} rid={request_id}"
            f"{f' trace={ids[0]} span={ids[1]}' if ids else ''}")
        writer = self._writer
        if writer is not None and not self._json:
            writer.add(f"{self._clock.stamps()[1]} INFO gateway.access: {message}\n")
            return
        # The ECS fields, each object's keys in sorted order (as ecs-logging writes them).
        url: dict[str, Any] = {}
        if host is not None:
            url["domain"], port = split_host(host)
            url["path"] = path
            if port is not None:
                url["port"] = port
        else:
            url["path"] = path
        fields: dict[str, Any] = {}
        if writer is not None:
            fields["@timestamp"] = self._clock.stamps()[0]
            fields["log.level"] = "info"
            fields["message"] = message
        fields["client"] = {"ip": client_ip}
        if route is not None:
            up = route.upstream
            fields["destination"] = {"address": up.host, "port": up.port}
        if writer is not None:
            fields["ecs.version"] = ecs_logging.ECS_VERSION
        if ex.error:
            fields["error"] = {"message": ex.error}
        fields["event"] = {"dataset": "gateway.access", "duration": round(duration * 1e9)}
        if route is not None:
            gateway: dict[str, Any] = {"route": route.name}
            if ex.upstream_status:
                gateway["upstream"] = {"duration": round(ex.upstream_time * 1e9),
                                       "status_code": ex.upstream_status}
            fields["gateway"] = gateway
        fields["http"] = {
            "request": {"body": {"bytes": ex.bytes_in}, "id": request_id, "method": method},
            "response": {"body": {"bytes": ex.bytes_out}, "status_code": status},
            "version": f"1.{minor}",
        }
        if writer is not None:
            fields["log"] = _LOGGER_FIELD
        if ids is not None:
            fields["span"] = {"id": ids[1]}
        if tls is not None:
            fields["tls"] = {"version": tls, "version_protocol": "tls"}
        if ids is not None:
            fields["trace"] = {"id": ids[0]}
        fields["url"] = url
        if user_agent is not None:
            fields["user_agent"] = {"original": user_agent}
        if writer is not None:
            writer.add(_encode(fields) + "\n")
        else:
            access_logger.info("%s", message, extra={"access": fields})
