"""One access-log line per request, written the way nginx writes its own: cheaply.

With ``--log-format json`` the line is an ECS document, the same fields ``gateway/logs.py``
gives every other line (``@timestamp``, ``log.level``, ``message``, ``ecs.version``,
``log.logger``); the request's are built here from values already at hand, named as in the
Elastic Common Schema, with the gateway's own facts under ``gateway.*``. With the text
format the same facts make one nginx-like line after logging's usual prefix.

When the process logs to a stream (``setup_logging``: stderr, or whatever file descriptor
that stream is), a line is serialised in one call (an f-string template of JSON-escaped
values; what repeats from line to line, a route's parts, the cleaned User-Agent and Host,
the date, is kept from the previous line rather than made again) and handed to a
``LineWriter``: lines are batched (64 KiB, or one second after the first) and written from
the loop with writes that never wait, so a slow or stopped reader of the log never stalls a
request: past ``pending_limit`` bytes waiting, lines are dropped and counted
(``gateway_access_log_dropped_total``). What is pending is written at exit, SIGTERM
included, for up to a second. Whether that stream takes INFO lines at all is decided once,
when the access log is made (the level is set at start-up). When logging was set up
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
import contextlib
import json
import logging
import math
import os
import re
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING

import ecs_logging
from aiohttp import hdrs

from gateway.logs import TEXT_TIME_FORMAT, access_destination, running_loop

if TYPE_CHECKING:
    from gateway.proxy import Exchange
    from gateway.routing import CompiledRoute

access_logger = logging.getLogger("gateway.access")

_time = time.time
_perf = time.perf_counter
_running_loop = running_loop  # (the writer's own name for it: tests count its calls)
_floor = math.floor
_USER_AGENT, _HOST_HEADER = hdrs.USER_AGENT, hdrs.HOST  # faster lookups than plain str keys
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
    """Whole lines to a file descriptor, batched, written without ever blocking the loop.

    Lines collect in memory; when ``batch`` bytes are waiting, or ``flush_after`` seconds
    after the first of them (nginx's ``buffer=64k flush=1s``), they are written from the
    loop, without a thread (handing batches to one cost more than writing them). The
    write never waits: a pipe or terminal is reopened as its own non-blocking open file
    (so that the flag does not reach the other writers of the process's stderr), a socket
    is sent to with MSG_DONTWAIT, and a regular file does not wait for a reader. What the
    destination does not take stays pending and is retried at the next batch; past
    ``pending_limit`` bytes pending, new lines are dropped and counted. Pipes and sockets
    get pieces of at most PIPE_BUF bytes ending at a line end: such a write is whole or
    nothing, so the lines of several workers sharing the stream never interleave. At exit
    (SIGTERM included) what is pending is written, waiting up to ``exit_timeout``.
    """

    def __init__(self, fd: int, *, pending_limit: int = 1 << 20, batch: int = 64 << 10,
                 flush_after: float = 1.0, exit_timeout: float = 1.0) -> None:
        self.target = self.fd = fd  # the process's descriptor; fd: the one written to
        self.pending_limit = pending_limit
        self.batch = batch
        self.flush_after = flush_after
        self.exit_timeout = exit_timeout
        self.dropped = 0
        self.owner = threading.get_ident()  # the thread that may use it (its loop's)
        self._lines: list[str] = []
        self._size = 0
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # a flush is pending in it
        self._pending = b""  # encoded, not yet taken by the destination
        self._closed = False
        self._send: Callable[[bytes | memoryview], int] = self._os_write
        self._piece = 0
        self._own_fd: int | None = None
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
            self._send = self._sock_send
            self._piece = select.PIPE_BUF
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            try:
                flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_APPEND
                self._own_fd = os.open(f"/proc/self/fd/{fd}", flags)
                self.fd = self._own_fd
            except OSError:  # no /proc: the shared descriptor, then, as it is
                pass
            self._piece = select.PIPE_BUF if stat.S_ISFIFO(mode) else 0
        atexit.register(self.close)

    def _os_write(self, data: bytes | memoryview) -> int:
        return os.write(self.fd, data)

    def _sock_send(self, data: bytes | memoryview) -> int:
        return self._sock.send(data, socket.MSG_DONTWAIT)

    def add(self, line: str) -> None:
        """Queue one line (ending in a newline), written within ``flush_after`` seconds of
        the first line of its batch (or when the loop its flush is pending in runs again;
        at exit at the latest)."""
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.batch:
            self.flush()
            return
        # Most lines: a flush is already pending in a loop that is still there. (Not asked
        # of asyncio per line: in Python 3.11 finding the running loop makes a getpid
        # system call, which cost more than the rest of the line.)
        pending = self._timer_loop
        if pending is not None and not pending.is_closed():
            return
        loop = _running_loop()
        if loop is None:
            self.flush()
            return
        self._timer_loop = loop
        loop.call_later(self.flush_after, self.flush)

    def write_now(self, line: str) -> None:
        """Queue one line (ending in a newline) and write what is waiting, as far as the
        destination takes it, now."""
        self._lines.append(line)
        self._size += len(line)
        self.flush()

    def flush(self) -> None:
        """Write what was collected and what was pending, as far as the destination takes it."""
        self._timer_loop = None
        lines = self._lines
        if lines:
            self._lines = []
            self._size = 0
            if len(self._pending) > self.pending_limit or self._closed:
                self.dropped += len(lines)
            else:
                self._pending += "".join(lines).encode("utf-8", "backslashreplace")
        if self._pending:
            self._write()

    def _write(self) -> None:
        data = self._pending
        start, end, piece = 0, len(data), self._piece
        try:
            while start < end:
                stop = end
                if piece and end - start > piece:
                    cut = data.rfind(b"\n", start, start + piece)
                    stop = cut + 1 if cut >= 0 else end
                start += self._send(memoryview(data)[start:stop])
        except (BlockingIOError, InterruptedError):
            pass  # full: the rest waits for the next batch
        except OSError:
            # Gone (EPIPE, ENOSPC...): what was not written is lost, and counted.
            self.dropped += data.count(b"\n", start)
            start = end
        self._pending = data[start:]

    def close(self) -> None:
        """Write what is pending, waiting at most ``exit_timeout`` for the destination."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        deadline = time.monotonic() + self.exit_timeout
        while self._pending and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(OSError, ValueError):
                select.select([], [self.fd], [], left)
            self._write()
        self.dropped += self._pending.count(b"\n")
        self._pending = b""
        if self.dropped:
            logging.getLogger("gateway").warning(
                "log: %d line(s) dropped in all because its destination did not keep up",
                self.dropped)
        if self._own_fd is not None:
            os.close(self._own_fd)
        atexit.unregister(self.close)


def process_writer() -> LineWriter | None:
    """The writer to the process's log stream, or None when logging is not a stream."""
    handler = access_destination(access_logger)
    return handler.writer() if handler is not None else None


def dropped_lines() -> int:
    """Log lines (access lines and others) dropped by this process because the log's
    destination could not keep up."""
    handler = access_destination(access_logger)
    return handler.lines.dropped if handler is not None and handler.lines is not None else 0


class _Clock:
    """The line's timestamps, from the request's end on the ``perf_counter`` clock (read
    once per request already, for its duration; reading the wall clock as well cost as
    much as the rest of the stamp). The wall second a request ended in is found and
    formatted once a second (``head``), with the ``perf_counter`` value at which that second
    began (``start``); a line's milliseconds are then ``millis[(end - start) * 1000]``, from
    a table made once. The wall clock is read again at every new second, so a step of the
    system clock shows in the lines within a second."""

    def __init__(self, *, utc: bool) -> None:
        self._utc = utc
        # ECS ``@timestamp``: UTC, milliseconds; text: logging's ``%(asctime)s``, local time.
        self.millis = tuple(f"{i:03d}{'Z' if utc else ''}" for i in range(1000))
        self.start = 0.0
        self.head = ""
        self.second(_perf())

    def second(self, end: float) -> int:
        """Moves to the wall second in which the ``perf_counter`` value ``end`` fell; the
        index of its millisecond in ``millis``."""
        wall = _time() - (_perf() - end)
        second = _floor(wall)
        self.start = end - (wall - second)
        self.head = (time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)) if self._utc
                     else time.strftime(TEXT_TIME_FORMAT + ",", time.localtime(second)))
        return min(_floor((wall - second) * 1000), 999)


# A duration in milliseconds with one decimal (the nearest tenth), by tenths of a
# millisecond up to this many (longer ones are formatted): formatting a float costs more
# than the rest of a text line.
_TENTHS = 2000


def _tenths() -> tuple[str, ...]:
    return tuple(f"{k // 10}.{k % 10}" for k in range(_TENTHS))


_VERSIONS = ("HTTP/1.0", "HTTP/1.1")  # by the request's minor version
_q = encode_basestring_ascii  # a str as a quoted JSON string (C)
_ECS_VERSION = f',"ecs.version":"{ecs_logging.ECS_VERSION}"'


class _RouteParts:
    """A route's constant parts of the line, made once per route (routes live until a
    reload builds new ones): the text ``route=... upstream=`` and ``@host rid=`` (also as
    they read inside the JSON ``message``), and the JSON ``destination`` and ``gateway``."""

    __slots__ = ("json_destination", "json_gateway", "json_route", "json_upstream", "route",
                 "text_route", "text_upstream")

    def __init__(self, route: CompiledRoute | None) -> None:
        self.route = route  # alive while its parts are kept: its id names no other object
        if route is None:
            self.text_route, self.text_upstream = " route=None upstream=", " rid="
            self.json_destination = self.json_gateway = ""
        else:
            up = route.upstream
            self.text_route = f" route={route.name} upstream="
            self.text_upstream = f"@{up.host_header} rid="
            self.json_destination = (f',"destination":{{"address":{_q(up.host)},'
                                     f'"port":{up.port}}}')
            self.json_gateway = f',"gateway":{{"route":{_q(route.name)}'
        self.json_route = _q(self.text_route)[1:-1]
        self.json_upstream = _q(self.text_upstream)[1:-1]


class AccessLog:
    """Writes each request's line. ``tls``: whether client connections can be TLS (the
    listener's setting), so that a plain listener does not ask each connection."""

    def __init__(self, *, enabled: bool = True, tls: bool = True) -> None:
        handler = access_destination(access_logger) if enabled else None
        # The level is set once at start-up when logging is the process's stream; otherwise
        # ``logging`` decides per record (a test or an embedding application may change it).
        if handler is not None and not access_logger.isEnabledFor(logging.INFO):
            enabled = False
        self.enabled = enabled
        self._writer = process_writer() if enabled and handler is not None else None
        # Without a stream, the record's fields are read back from the JSON line.
        self._json = self._writer is None or handler is None or handler.shape == "json"
        self._tls = tls
        self._clock = _Clock(utc=self._json)
        self._tenths = _tenths()
        # Status codes as the line writes them; 0 (no upstream answer) as "-".
        self._codes = ("-", *(str(n) for n in range(1, 1000)))
        # By id: a route's hash walks all its fields.
        self._routes: dict[int, _RouteParts] = {}
        self._parts = self._routes[id(None)] = _RouteParts(None)
        # The last raw User-Agent and Host and how they are logged (in the text, and the
        # JSON members they make): a run of requests from one client repeats them, and
        # cleaning is a regex each. (Replaced on every change: nothing of one visitor
        # outlives the next line.)
        self._ua: tuple[str | None, str, str] = (None, "-", "}\n")
        self._host: tuple[str | None, str, str, str] = (None, "-", ',"url":{"path":', "}")
        # The last pair of them and what they make together: the text's `` host=... ua="..."
        # tls=``, the same inside the JSON message, then the JSON pieces of ``_host`` and
        # ``_ua`` (Host before the path, after it, and the User-Agent ending the line).
        self._client = self._see_client(None, None)
        self._method = ("", '""')  # the last method and its JSON string (a token: few)

    def _route_parts(self, route: CompiledRoute | None) -> _RouteParts:
        parts = self._routes.get(id(route))
        if parts is None:
            parts = self._routes[id(route)] = _RouteParts(route)
        self._parts = parts
        return parts

    def _see_user_agent(self, raw: str | None) -> tuple[str | None, str, str]:
        """A new User-Agent: as the text says it, and the end of the JSON line with it
        (printable ASCII without quotes or backslashes needs the quotes only)."""
        agent = clean_user_agent(raw)
        self._ua = (raw, agent or "-",
                    f',"user_agent":{{"original":"{agent}"}}}}\n' if agent else "}\n")
        return self._ua

    def _see_client(self, raw_ua: str | None, raw_host: str | None
                    ) -> tuple[str | None, str | None, str, str, str, str, str]:
        """A new User-Agent or Host (or both): the pieces of the line they make."""
        ua = self._ua if raw_ua == self._ua[0] else self._see_user_agent(raw_ua)
        host = self._host if raw_host == self._host[0] else self._see_host(raw_host)
        self._client = (raw_ua, raw_host, f' host={host[1]} ua="{ua[1]}" tls=',
                        f' host={host[1]} ua=\\"{ua[1]}\\" tls=', host[2], host[3], ua[2])
        return self._client

    def _see_host(self, raw: str | None) -> tuple[str | None, str, str, str]:
        """A new Host: as the text says it, and the JSON ``url`` before and after the path."""
        host = clean_host(raw)
        if host is None:
            self._host = (raw, "-", ',"url":{"path":', "}")
        else:
            domain, port = split_host(host)
            self._host = (raw, host, f',"url":{{"domain":"{domain}","path":',
                          f',"port":{port}}}' if port is not None else "}")
        return self._host

    def log_exchange(self, client_ip: str, request_id: str, method: str, raw_path: str,
                     minor: int, status: int, route: CompiledRoute | None, ex: Exchange,
                     duration: float, end: float | None = None) -> None:
        """``end``: when the request ended, a ``time.perf_counter()`` value (read now when
        not given)."""
        # The hot part of every request: values at hand, one f-string, no calls that can
        # be avoided (the parts that change rarely are kept from the previous line).
        writer = self._writer
        if writer is None and not access_logger.isEnabledFor(logging.INFO):
            return
        if end is None:
            end = _perf()
        clock = self._clock
        i = _floor((end - clock.start) * 1000)  # (floor: cheaper than int() for a float)
        if i >= 1000 or i < 0:
            i = clock.second(end)
        k = _floor(duration * 10000 + 0.5)  # tenths of a millisecond, the nearest
        took = self._tenths[k] if 0 <= k < _TENTHS else f"{duration * 1000:.1f}"
        path = raw_path.partition("?")[0] if "?" in raw_path else raw_path
        headers = ex.headers
        if headers is not None:
            raw_ua, raw_host = headers.get(_USER_AGENT), headers.get(_HOST_HEADER)
        else:
            raw_ua = raw_host = None
        client = self._client
        if raw_ua != client[0] or raw_host != client[1]:
            client = self._see_client(raw_ua, raw_host)
        tls = tls_version(ex) if self._tls else None
        trace = ex.trace
        ids = trace.ids() if trace is not None else None
        parts = self._parts  # the previous line's, most often
        if parts.route is not route:
            parts = self._route_parts(route)
        upstream = ex.upstream_status
        codes = self._codes
        try:  # (tables: formatting a number costs more than the rest of a piece)
            version, code, upstream_code = _VERSIONS[minor], codes[status], codes[upstream]
        except IndexError:  # not HTTP/1.0 or 1.1, or a status not of three digits
            version = f"HTTP/1.{minor}"
            code, upstream_code = str(status), str(upstream or "-")
        if not self._json:
            assert writer is not None
            writer.add(
                f"{clock.head}{clock.millis[i]} INFO gateway.access: {client_ip} {method} {path} "
                f"{version} {code} {ex.bytes_in}/{ex.bytes_out} {took}ms"
                f"{client[2]}{tls or '-'}{parts.text_route}"
                f"{upstream_code}{parts.text_upstream}{request_id}"
                f"{f' trace={ids[0]} span={ids[1]}' if ids else ''}\n")
            return
        # The ECS document: a template of JSON-escaped values, each object's keys in sorted
        # order after the three ECS puts first, as ecs-logging writes them (encoding a nest
        # of dicts costs several times more than the rest of the line). ``message`` is the
        # text line's message, made of the same escaped values (escaping works piece by
        # piece); the cleaned User-Agent and Host, the TLS version and the trace ids are
        # printable ASCII without quotes or backslashes and need no escaping.
        q_ip, q_path, q_rid = _q(client_ip), _q(path), _q(request_id)
        q_method = self._method[1] if method == self._method[0] else self._see_method(method)
        error = ex.error
        if route is None:
            gateway = ""
        elif upstream:
            gateway = (f'{parts.json_gateway},"upstream":{{"duration":'
                       f'{round(ex.upstream_time * 1e9)},"status_code":{upstream_code}}}}}')
        else:
            gateway = parts.json_gateway + "}"
        line = (
            f'{{"@timestamp":"{clock.head}{clock.millis[i]}","log.level":"info",'
            f'"message":"{q_ip[1:-1]} '
            f'{q_method[1:-1]} {q_path[1:-1]} {version} {code} '
            f'{ex.bytes_in}/{ex.bytes_out} {took}ms{client[3]}'
            f'{tls or "-"}{parts.json_route}{upstream_code}'
            f'{parts.json_upstream}{q_rid[1:-1]}'
            f'{f" trace={ids[0]} span={ids[1]}" if ids else ""}",'
            f'"client":{{"ip":{q_ip}}}{parts.json_destination}{_ECS_VERSION}'
            f'{f",{_q_error(error)}" if error else ""}'
            f',"event":{{"dataset":"gateway.access","duration":{round(duration * 1e9)}}}'
            f'{gateway}'
            f',"http":{{"request":{{"body":{{"bytes":{ex.bytes_in}}},'
            f'"id":{q_rid},"method":{q_method}}},'
            f'"response":{{"body":{{"bytes":{ex.bytes_out}}},"status_code":{status}}},'
            f'"version":"1.{minor}"}},"log":{{"logger":"gateway.access"}}'
            f'{f",{_span_json(ids[1])}" if ids else ""}'
            f'{f",{_tls_json(tls)}" if tls else ""}'
            f'{f",{_trace_json(ids[0])}" if ids else ""}'
            f'{client[4]}{q_path}{client[5]}{client[6]}')
        if writer is not None:
            writer.add(line)
            return
        # logging's record carries the request's fields (EcsFormatter adds the rest).
        fields = json.loads(line)
        message = fields["message"]
        for key in ("@timestamp", "log.level", "message", "ecs.version", "log"):
            del fields[key]
        access_logger.info("%s", message, extra={"access": fields})

    def _see_method(self, method: str) -> str:
        self._method = (method, _q(method))
        return self._method[1]


# The line's optional members (rare, or only with tracing or TLS on).
def _q_error(error: str) -> str:
    return f'"error":{{"message":{_q(error)}}}'


def _span_json(span_id: str) -> str:
    return f'"span":{{"id":"{span_id}"}}'


def _trace_json(trace_id: str) -> str:
    return f'"trace":{{"id":"{trace_id}"}}'


def _tls_json(version: str) -> str:
    return f'"tls":{{"version":"{version}","version_protocol":"tls"}}'
