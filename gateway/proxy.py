"""Forwarding one request over a pooled upstream connection and streaming the answer back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol

from gateway.aiohttp_adapter import HttpVersion, HttpVersion11, drain
from gateway.boundary import RESPONSE_HEADERS
from gateway.errors import ClientBodyError, PayloadTooLarge, UpstreamError, UpstreamTimeout
from gateway.headers import HOP_BY_HOP, Forwarded, extra_hop_by_hop
from gateway.policy import EMPTY_BODY_FRAMING, IDEMPOTENT, ForwardingPolicy
from gateway.routing import CompiledRoute
from gateway.upstream import Body, InvalidResponse, Response, UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    from gateway.tracing import RequestTrace

log = logging.getLogger("gateway.proxy")

_SPECIAL = HOP_BY_HOP | RESPONSE_HEADERS  # dropped or rewritten on the way to the client
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(slots=True)
class Exchange:
    """What the access log and metrics want to know about one forwarded request."""

    upstream_status: int = 0
    upstream_time: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    retried: bool = False
    error: str = ""
    route: CompiledRoute | None = None  # known before the answer, for a cancelled exchange
    https: bool = False  # the visitor's scheme (listen.tls, or a trusted X-Forwarded-Proto)
    extra_response_headers: list[tuple[str, str]] = field(default_factory=list)
    # Read at the end, for the access line and the spans (gateway/accesslog.py, tracing.py).
    headers: Mapping[str, str] | None = None  # the client's request headers
    transport: asyncio.BaseTransport | None = None  # the client connection (TLS facts)
    trace: RequestTrace | None = None  # set when tracing is on


@dataclass(frozen=True, slots=True)
class ProxySettings:
    read_timeout: float
    client_body_timeout: float
    max_body: int  # 0 = unlimited
    send_timeout: float = 60.0  # a client that reads nothing for this long is dropped


def cut_off(transport: asyncio.BaseTransport, close_delimited: bool) -> None:
    """End a response the upstream broke off, so that the client can tell it is short.

    Content-Length and chunked framing already say so on a plain close (which also lets
    the bytes written so far arrive). A close-delimited body (an HTTP/1.0 client) would
    look complete after a FIN, so it gets a reset.
    """
    if close_delimited:
        reset(transport)
    else:
        transport.abort()  # type: ignore[attr-defined]


def reset(transport: asyncio.BaseTransport) -> None:
    """Abort with a TCP reset (bytes still unsent are dropped)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


async def drain_client(protocol: BaseProtocol, send_timeout: float) -> None:
    """Wait for a slow client to take what was written, at most ``send_timeout`` seconds."""
    try:
        async with asyncio.timeout(send_timeout or None):
            await drain(protocol)
    except TimeoutError:
        raise ConnectionResetError(
            f"the client read nothing for {send_timeout:g}s (send timeout)") from None


class HttpDate:
    """The ``Date`` line the gateway adds when the upstream sent none (RFC 9110 §6.6.1:
    a recipient forwarding a response without one must add it), formatted once a second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: %s\r\n" % time.strftime(
                "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode("ascii")
        return self._line


class Proxy:
    def __init__(self, pool: UpstreamPool, settings: ProxySettings) -> None:
        self.pool = pool
        self.settings = settings
        self.date = HttpDate()

    async def forward(self, request: web.BaseRequest, route: CompiledRoute, target: str,
                      fwd: Forwarded, request_id: str | None, ex: Exchange, *,
                      body: bytes | None = None, body_type: str | None = None,
                      cors: Sequence[tuple[str, str]] | None = None) -> web.StreamResponse:
        """Send ``request`` to ``route`` and stream the answer; ``body`` replaces the client's."""
        method = request.method
        up = route.upstream
        streaming = body is None and request.body_exists
        chunked = False
        framing: list[tuple[bytes, bytes]] = []
        if body is not None:
            framing.append((b"Content-Length", str(len(body)).encode()))
            ex.bytes_in = len(body)
        elif streaming:
            length = request.content_length
            if length is None:
                chunked = True
                framing.append((b"Transfer-Encoding", b"chunked"))
            else:
                if self.settings.max_body and length > self.settings.max_body:
                    raise PayloadTooLarge(f"body of {length} bytes is over the limit")
                framing.append((b"Content-Length", str(length).encode()))
                content = request.content
                if content.is_eof() and content.total_bytes == length:
                    # A small body that arrived with the head: send it in the same write,
                    # with no sender task (it is already in memory, nothing is copied twice).
                    body = content.read_nowait(-1)
                    streaming = False
                    ex.bytes_in = len(body)
            if streaming and request.headers.get("Expect", "").lower() == "100-continue":
                assert request.transport is not None
                request.transport.write(_CONTINUE)
        elif method in EMPTY_BODY_FRAMING:
            framing.append((b"Content-Length", b"0"))
        head = ForwardingPolicy.upstream_head(route, method, target, request.raw_headers,
                                              request.host, fwd, request_id,
                                              request.headers.getall("Connection", ()),
                                              framing=framing, body_type=body_type,
                                              trace=ex.trace)
        if body:
            head += body
        # A replay is safe only for idempotent methods whose body we still hold.
        attempts = 2 if (method in IDEMPOTENT and not streaming) else 1
        started = time.perf_counter()  # a duration: the loop clock may tick in whole ms
        for attempt in range(attempts):
            conn = await self.pool.acquire(up, fresh=attempt > 0)
            fut = conn.start(bytes(head), method=method, read_timeout=self.settings.read_timeout)
            sender: asyncio.Task[int] | None = None
            if streaming:
                sender = asyncio.ensure_future(self._send_body(request, conn, chunked))
            else:
                conn.arm_read_timeout()
            try:
                if sender is not None:
                    await asyncio.wait((fut, sender), return_when=asyncio.FIRST_COMPLETED)
                    if sender.done():
                        ex.bytes_in = sender.result()  # raises ClientBodyError / PayloadTooLarge
                        conn.arm_read_timeout()
                message, payload = await fut
            except asyncio.CancelledError:
                if sender is not None:
                    sender.cancel()
                conn.abort()
                raise
            except UpstreamError as exc:
                if sender is not None:
                    sender.cancel()
                conn.abort()
                # A pooled connection the upstream closed while idle, or one whose stray
                # bytes from before arrived as the "answer": retry once, fresh. (Not after a
                # timeout, nor an invalid answer on a fresh connection: that is the answer.)
                if attempt + 1 < attempts and not isinstance(exc, UpstreamTimeout) and (
                        conn.reused or not isinstance(exc, InvalidResponse)):
                    ex.retried = True
                    log.debug("retrying %s %s on a fresh connection: %s", method, target, exc)
                    continue
                raise
            except BaseException:
                if sender is not None:
                    sender.cancel()
                conn.abort()
                raise
            ex.upstream_time = time.perf_counter() - started
            return await self._respond(request, route, conn, message, payload, sender, ex, cors)
        raise AssertionError("unreachable")

    async def _send_body(self, request: web.BaseRequest, conn: UpstreamConnection,
                         chunked: bool) -> int:
        content = request.content
        limit = self.settings.max_body
        sent = 0
        timeout = self.settings.client_body_timeout or None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout) as deadline:
            while True:
                try:
                    chunk = await content.readany()
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    raise ClientBodyError(f"client body broke off: {exc}") from None
                except Exception as exc:  # aiohttp signals bad chunked framing this way
                    raise ClientBodyError(f"client body is malformed: {exc}") from None
                if not chunk:
                    break
                sent += len(chunk)
                if limit and sent > limit:
                    raise PayloadTooLarge(f"body is over {limit} bytes")
                if chunked:
                    conn.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                else:
                    conn.write(chunk)
                await conn.drain()
                if timeout is not None:
                    deadline.reschedule(loop.time() + timeout)
        if chunked:
            conn.write(b"0\r\n\r\n")
        return sent

    async def _respond(self, request: web.BaseRequest, route: CompiledRoute,
                       conn: UpstreamConnection, message: Response,
                       payload: Body, sender: asyncio.Task[int] | None, ex: Exchange,
                       cors: Sequence[tuple[str, str]] | None) -> web.StreamResponse:
        """Write the upstream's answer straight to the client transport.

        aiohttp's StreamResponse would rebuild the headers into a CIMultiDict, serialise
        them again and send them in a write of their own; a proxy already has the bytes.
        """
        code = message.code
        ex.upstream_status = code
        head, rechunk, keep_alive, no_body = response_head(
            message, route, request.version, request.keep_alive, request.method == "HEAD",
            (*ex.extra_response_headers, *(cors or ())), https=ex.https, date=self.date)
        transport = request.transport
        protocol = request.protocol
        sent_all = False
        out = 0
        try:
            if transport is None or transport.is_closing():
                raise ConnectionResetError("client went away")
            if no_body or payload.done:
                # The whole body is already here (the common small response): one write.
                data = b"" if no_body else payload.take()
                out = len(data)
                transport.write(head + (framed_last(data) if rechunk else data))
            else:
                transport.write(head)
                while True:
                    chunk = await payload.readany()
                    if not chunk:
                        break
                    if transport.is_closing():
                        raise ConnectionResetError("client went away")
                    out += len(chunk)
                    if rechunk:
                        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    else:
                        transport.write(chunk)
                    if protocol.writing_paused:
                        await drain_client(protocol, self.settings.send_timeout)
                if rechunk:
                    transport.write(b"0\r\n\r\n")
            sent_all = True
        except UpstreamError as exc:
            # Headers are gone already: cut the client off so it can tell the body is short.
            ex.error = str(exc)
            keep_alive = False
            log.warning("upstream broke off mid-response on %s: %s", route.name, exc)
            if transport is not None:
                cut_off(transport, close_delimited=not keep_alive and not rechunk
                        and message.length is None)
        except (ConnectionError, asyncio.CancelledError) as exc:
            ex.error = str(exc) or "client went away"
            keep_alive = False
            conn.abort()
            if transport is not None and not transport.is_closing():
                reset(transport)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            ex.bytes_out = out
            if sender is not None and not sender.done():
                # The upstream answered before reading the whole body: the connection's
                # state is unknown, so it cannot be reused.
                sender.cancel()
                sent_all = False
            elif sender is not None and not sender.cancelled() and sender.exception() is None:
                ex.bytes_in = sender.result()
            conn.finish(reusable=sent_all and not message.should_close and not message.upgrade)
        return Sent(code, keep_alive)  # type: ignore[return-value]


def response_head(message: Response, route: CompiledRoute, version: HttpVersion,
                  keep_alive: bool, head_request: bool, extra: Sequence[tuple[str, str]],
                  extra_lines: bytes = b"", *, date: HttpDate, https: bool = False
                  ) -> tuple[bytes, bool, bool, bool]:
    """The response head for the client: (bytes, re-chunk the body?, keep-alive?, no body?).

    The upstream's framing is not the client's: the body's length is sent as one
    Content-Length the reader checked, and a chunked upstream body is re-chunked for
    HTTP/1.1 clients and close-delimited for HTTP/1.0 ones.
    """
    code = message.code
    no_body = head_request or code in (204, 304) or code < 200
    rechunk = False
    length = message.length
    if not no_body and length is None:
        if version >= HttpVersion11:
            rechunk = True
        else:
            keep_alive = False  # HTTP/1.0 client: the end of the body is the close
    # Pieces joined once at the end (cheaper than growing a bytearray piece by piece).
    head = [b"HTTP/%d.%d %d %s\r\n" % (version.major, version.minor, code, message.reason)]
    if not message.has_date:
        head.append(date.line())
    head.append(response_header_bytes(message.raw_headers, route, message.connection, https))
    if length is not None and code >= 200 and code != 204:
        head.append(b"Content-Length: %d\r\n" % length)
    for name, value in extra:
        head.append(f"{name}: {value}\r\n".encode("latin-1"))
    head.append(extra_lines)  # header lines already encoded, CRLF included
    if rechunk:
        head.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    elif version < HttpVersion11:
        head.append(b"Connection: keep-alive\r\n")
    head.append(b"\r\n")
    return b"".join(head), rechunk, keep_alive, no_body


class Sent:
    """Stands in for a StreamResponse whose bytes the proxy already wrote itself.

    aiohttp's connection loop only asks a finished response to prepare/write_eof (no-ops
    here) and whether to keep the connection alive.
    """

    __slots__ = ("keep_alive", "status")
    prepared = True
    body_length = 0

    def __init__(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def framed_last(data: bytes) -> bytes:
    """A whole body as the last (or only) chunks of a chunked message."""
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"


def response_header_bytes(raw: Sequence[tuple[bytes, bytes]], route: CompiledRoute,
                          connection: Sequence[str], https: bool = False) -> bytes:
    """Upstream response header lines as the client should see them (no framing headers):
    hop-by-hop ones dropped; ``Set-Cookie``, ``Location``, ``Content-Location``, ``Refresh``
    and ``Access-Control-*`` as the route's trust boundary (gateway/boundary.py) says."""
    tokens = extra_hop_by_hop(raw, connection)
    policy = route.policy
    # Access-Control-* headers are the policy's to judge only where it strips them; where
    # it does not, they pass as they are (RoutePolicy.response_value), unlooked-at.
    strip_cors = policy.strip_cors
    watch = strip_cors or bool(tokens)  # more names to look at than _SPECIAL's
    lines: list[bytes] = []
    for name, value in raw:
        lname = name.lower()
        # The usual field is none of these: one set lookup, then its line.
        if lname in _SPECIAL or (watch and (lname in tokens or (
                strip_cors and lname.startswith(b"access-control-")))):
            if lname in HOP_BY_HOP or lname in tokens:
                continue
            checked = policy.response_value(lname, value, route.urls, https)
            if checked is None:
                continue
            value = checked
        # One short line per field, joined once: fewer steps than growing a bytearray
        # four times per field.
        lines.append(name + b": " + value)
    if not lines:
        return b""
    lines.append(b"")
    return b"\r\n".join(lines)
