"""The listening side: aiohttp's low-level server with the gateway's limits, TLS and shutdown.

aiohttp parses requests (its C parser) and manages keep-alive; this module adds what it
does not: the right status for what the parser refuses (414, 431, 501, 505, 400) written by
one error writer in HTTP/1.1 with ``Connection: close``, an access-log line and a metric
for each refusal, a deadline for a client to finish sending its headers (slowloris), and a
graceful shutdown in stages (stop accepting, drain, then cancel).

Nothing a client sent reaches a log line from here: aiohttp's parser messages quote the
offending line (cookies, Authorization, query strings), so only the error's class and
llhttp's fixed reason are logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.aiohttp_adapter import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    HttpVersion11,
    InvalidURLError,
    LineTooLong,
    Protocol,
    RawRequestMessage,
    RequestHandler,
    Server,
)
from gateway.config import Config
from gateway.memory import CrowdRelease
from gateway.policy import error_response
from gateway.tls import server_context

log = logging.getLogger("gateway.server")

# llhttp's own reasons are fixed phrases ending in ':'; whatever follows quotes the client.
_FIXED_REASON = re.compile(r"^\s*([A-Za-z][A-Za-z ]{0,80}):$")
_VERSION = re.compile(r" HTTP/(\d)\.(\d)'\n")
_REQUEST_LINE_START = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ (/|[A-Za-z][A-Za-z0-9+.-]*://)")
# A connection's first line with a method and a target but no version: HTTP/0.9. llhttp
# would wait for a header section that a 0.9 client never sends.
_HTTP09_LINE = re.compile(rb"(?:\r?\n)*([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([^ \r\n]+)\r?\n")


class Refused(Exception):
    """A request the parser layer read whole but will not serve (HTTP version, coding)."""

    def __init__(self, status: int, reason: str, text: str, method: str, path: str, *,
                 body_only: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.text = text
        self.method = method
        self.path = path
        self.body_only = body_only


def http09(method: str, path: str) -> Refused:
    # HTTP/0.9 has no status line: nginx answers such a request with a bare body.
    return Refused(400, "http_0_9", "Bad Request: HTTP/0.9 is not served", method, path,
                   body_only=True)


def vet(msg: RawRequestMessage) -> Refused | None:
    """What the parser accepts but the gateway must refuse before either request path."""
    version = msg.version
    if version is not HttpVersion11 and version.major != 1:
        if version.major == 0:
            return http09(msg.method, msg.path)
        return Refused(505, "version_not_supported", "HTTP Version Not Supported", msg.method,
                       msg.path)
    if msg.chunked:
        te = msg.headers.get("Transfer-Encoding", "")
        if te.strip(" \t").lower() != "chunked":
            # Framed by a final chunked, but with codings before it that nobody here decodes
            # (RFC 9112 6.1: 501); forwarding it as plain chunked would drop the coding.
            return Refused(501, "transfer_coding", "Not Implemented: transfer coding",
                           msg.method, msg.path)
    return None


def _is_target(line: object) -> bool:
    # The C parser reports an overlong request target from its URL buffer (a bytearray);
    # header names and values come as bytes. The pure-Python parser (AIOHTTP_NO_EXTENSIONS)
    # quotes the start of the request line instead: a method, then a path or absolute URL.
    if isinstance(line, bytearray):
        return True
    if isinstance(line, str):
        line = line.encode("latin-1", "replace")
    return isinstance(line, bytes) and _REQUEST_LINE_START.match(line) is not None


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(status, metric reason, short body text) for what the parser layer refused."""
    if isinstance(exc, Refused):
        return exc.status, exc.reason, exc.text
    if isinstance(exc, LineTooLong):
        if _is_target(exc.args[0] if exc.args else b""):
            return 414, "uri_too_long", "URI Too Long"
        return 431, "header_too_large", "Request Header Fields Too Large"
    text = str(exc)
    if "Too many headers" in text:
        return 431, "too_many_headers", "Request Header Fields Too Large"
    if isinstance(exc, BadHttpMethod):
        return 400, "bad_method", "Bad Request"
    if isinstance(exc, BadStatusLine):
        m = _VERSION.search(text)
        if m is not None and int(m.group(1)) >= 2:
            return 505, "version_not_supported", "HTTP Version Not Supported"
        return 400, "bad_request_line", "Bad Request"
    if isinstance(exc, InvalidURLError):
        return 400, "bad_target", "Bad Request"
    lower = text.lower()
    if "content-length" in lower or "transfer-encoding" in lower or "chunk" in lower:
        return 400, "bad_framing", "Bad Request"
    if "header" in lower:
        return 400, "bad_header", "Bad Request"
    return 400, "bad_request", "Bad Request"


def describe(exc: BaseException) -> str:
    """The error's class and llhttp's fixed reason: never a byte of the request."""
    name = type(exc).__name__
    message = getattr(exc, "message", "")
    reasons = []
    for line in (message if isinstance(message, str) else "").split("\n"):
        m = _FIXED_REASON.match(line)
        if m is None:
            break
        reasons.append(m.group(1))
    return f"{name}: {'; '.join(reasons)}" if reasons else name


class _BodyOnly(web.Response):
    """An answer to an HTTP/0.9 request: no status line and no headers, as nginx sends."""

    async def _write_headers(self) -> None:
        return None


class _GatewayRequestHandler(Protocol):
    """aiohttp's per-connection protocol plus the client-header deadline and refusals."""

    _header_deadline: float = 0.0
    _header_timer: asyncio.TimerHandle | None = None
    _head_started = False  # bytes of a request head have arrived and it is not complete
    _parse_failed = False  # the rest of the stream is not HTTP: stop parsing it
    _first_data = True  # nothing received yet on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        crowd: CrowdRelease | None = getattr(self.server, "crowd", None)
        if crowd is not None:
            crowd.opened()
        self._arm_header_timer(head_started=False)

    def _arm_header_timer(self, head_started: bool = True) -> None:
        if head_started:
            self._head_started = True
        timeout = getattr(self.server, "client_header_timeout", 0.0)
        if timeout and self._header_timer is None:
            self._header_timer = self.event_loop.call_later(timeout, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        log.info("dropping a client that took too long to send its request headers")
        if self._head_started and not self.closing:
            # nginx closes without an answer too, and logs 408.
            timeout = getattr(self.server, "client_header_timeout", 0.0)
            self._report(408, "client_header_timeout", None, 0, duration=timeout)
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def _parse(self, data: bytes) -> None:
        """Feed the parser and take every request it completes, one at a time."""
        if self._parse_failed:
            return
        messages = self.queue
        count = self.parsed
        if self._first_data:
            self._first_data = False
            m = _HTTP09_LINE.match(data)
            if m is not None:
                refused = http09(m.group(1).decode("latin-1"), m.group(2).decode("latin-1"))
                self.queue_error(None, 400, refused)
                self._parse_failed = True
                self.wake_loop()
                return
        self.feed(data)
        while self.parsed != count:
            new = self.parsed - count
            for i in range(len(messages) - new, len(messages)):
                if self._vet_at(i):
                    return
            # Stop at aiohttp's queue limit (it paused the transport; draining the queue
            # resumes it and calls us again), never merely because reading is paused: the
            # requests already buffered in the parser would then wait for bytes that the
            # client, having sent them all, never sends. The protocol's own queue bounds
            # what is buffered; the parser's queue of one only stops between messages.
            if not self.parse_more(new):
                return
            count = self.parsed
            self.feed(b"")

    def _vet_at(self, i: int) -> bool:
        """Turn a request the gateway refuses into an error; True once parsing must stop."""
        messages = self.queue
        msg = messages[i][0]
        if self.is_parse_error(msg):
            self._parse_failed = True
        else:
            refused = vet(msg)
            if refused is None:
                return False
            self.queue_error(i, refused.status, refused)
            self._parse_failed = True
        while len(messages) > i + 1:
            messages.pop()
        return True

    def data_received(self, data: bytes) -> None:
        busy = bool(self.queue) or self.serving or self.busy_elsewhere()
        self._parse(data)
        if self.queue or self.past_http:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif not busy and data:
            # First bytes of a new request on a kept-alive connection: its headers are due.
            self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        crowd: CrowdRelease | None = getattr(self.server, "crowd", None)
        if crowd is not None:
            crowd.closed()
        super().connection_lost(exc)

    def _client_ip(self) -> str:
        name = self.peername
        return name[0] if isinstance(name, tuple) else "-"

    def _report(self, status: int, reason: str, refused: Refused | None, bytes_out: int, *,
                rid: str | None = None, duration: float = 0.0) -> None:
        """An access-log line and a metric for a request refused before routing."""
        gateway = getattr(self.server, "gateway", None)
        if gateway is None:
            return
        gateway.rejected(self._client_ip(), rid or gateway.ids.next(),
                         refused.method if refused else "-", refused.path if refused else "-",
                         status, reason, bytes_out, duration)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, Refused) and not (
                status == 400 and isinstance(exc, HttpProcessingError)):
            return super().handle_error(request, status, exc, message)
        # The one writer of the parser layer's answers: a short body, then close.
        code, reason, text = classify(exc)
        log.info("refused a request from %s: %d %s (%s)", self._client_ip(), code, reason,
                 describe(exc))
        gateway = getattr(self.server, "gateway", None)
        rid = gateway.ids.next() if gateway is not None else None
        refused = exc if isinstance(exc, Refused) else None
        if refused is not None and refused.body_only:
            resp: web.Response = _BodyOnly(text=f"{code} {text}\n")
        else:
            resp = error_response(code, text, {"X-Request-ID": rid} if rid else None)
        resp.force_close()
        body = resp.body
        self._report(code, reason, refused, len(body) if isinstance(body, bytes) else 0,
                     rid=rid)
        return resp


class GatewayServer(Server):
    """aiohttp's server, making the gateway's protocol for each connection."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], *,
                 client_header_timeout: float,
                 protocol: type[RequestHandler] = _GatewayRequestHandler,
                 gateway: Any = None, **kwargs: Any) -> None:
        super().__init__(handler, protocol=protocol, **kwargs)
        self.client_header_timeout = client_header_timeout
        self.gateway = gateway
        # Memory goes back to the system once a crowd of connections has closed.
        self.crowd = CrowdRelease(shed=self.shed_idle, remake=self.remake_counters)

    def remake_counters(self) -> None:
        """The per-request counters' number objects, made anew after a crowd."""
        gateway = self.gateway
        if gateway is not None:
            gateway.metrics.remake()
            gateway.ids.remake()

    def shed_idle(self, clients: int) -> None:
        """Close the upstream pools' idle connections beyond ``clients`` per upstream."""
        pool = getattr(self.gateway, "pool", None)
        if pool is not None:
            pool.shed(clients)


class ServerTLS:
    """The listener's TLS: one context for the socket, certificates swappable on reload.

    Every handshake's SNI callback (OpenSSL calls it with or without SNI) hands the
    connection the most recently loaded context, so new handshakes use the new pair while
    open connections keep the one they were made with. A pair that does not load raises
    TLSFilesError and the current one stays.
    """

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.current = server_context(cert_file, key_file)
        self.context = server_context(cert_file, key_file)
        self.context.sni_callback = self._pick

    def _pick(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
              _ctx: ssl.SSLContext) -> None:
        conn.context = self.current

    def reload(self, cert_file: Path, key_file: Path) -> None:
        self.current = server_context(cert_file, key_file)


def server_tls(cfg: Config) -> ServerTLS | None:
    tls = cfg.listen.tls
    return None if tls is None else ServerTLS(tls.cert_file, tls.key_file)


def make_server(cfg: Config, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                *, protocol: type[RequestHandler] = _GatewayRequestHandler, gateway: Any = None
                ) -> GatewayServer:
    size = cfg.limits.max_header_size or 1 << 20
    return GatewayServer(
        handler,
        protocol=protocol,
        gateway=gateway,
        client_header_timeout=cfg.timeouts.client_header,
        max_line_size=size,
        max_field_size=size,
        max_headers=cfg.limits.max_headers,
        keepalive_timeout=cfg.timeouts.keepalive,
        auto_decompress=False,
        access_log=None,
        handler_cancellation=True,
        lingering_time=2.0,
    )


def bind_socket(host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024
                ) -> socket.socket:
    """Bind before serving so `port: 0` and SO_REUSEPORT workers both work."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host in ("::", "") else 1)
    sock.bind(addr)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Listener:
    """A serving socket plus the staged shutdown uvicorn taught us."""

    def __init__(self, server: GatewayServer, sock: socket.socket,
                 ssl_ctx: ssl.SSLContext | None) -> None:
        self.server = server
        self.sock = sock
        self.ssl = ssl_ctx
        self._aserver: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._aserver = await loop.create_server(self.server, sock=self.sock, ssl=self.ssl,
                                                 backlog=1024)

    @property
    def address(self) -> tuple[str, int]:
        name = self.sock.getsockname()
        return name[0], name[1]

    async def stop(self, grace: float, before_drain: Callable[[], None] | None = None) -> None:
        """Stop accepting, let in-flight requests finish within ``grace``, then cancel."""
        if self._aserver is not None:
            self._aserver.close()
        if before_drain is not None:
            before_drain()
        # Idle keep-alive connections close now; busy ones after their current response.
        self.server.pre_shutdown()
        await self.server.shutdown(grace)
        self.server.crowd.close()
        if self._aserver is not None:
            await self._aserver.wait_closed()


def install_signal_handlers(stop: asyncio.Event, reload: Callable[[], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
