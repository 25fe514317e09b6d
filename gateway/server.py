"""The listening side: aiohttp's low-level server with the gateway's limits, TLS and shutdown.

aiohttp parses requests (its C parser) and manages keep-alive; this module adds what it
does not: 431 for oversized headers, a deadline for a client to finish sending its headers
(slowloris), and a graceful shutdown in stages (stop accepting, drain, then cancel).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.config import Config
from gateway.tls import server_context

log = logging.getLogger("gateway.server")
# Our own answers do not advertise the Python and aiohttp versions.
_SERVER = {"Server": "cec-gateway"}


class _GatewayRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol plus the client-header deadline and 431."""

    _header_deadline: float = 0.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        manager = self._manager
        timeout = getattr(manager, "client_header_timeout", 0.0)
        if timeout and self._header_timer is None:
            self._header_timer = self._loop.call_later(timeout, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        log.info("dropping a client that took too long to send its request headers")
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        busy = (bool(self._messages) or self._current_request is not None
                or getattr(self, "_inline", None) is not None)
        super().data_received(data)
        if self._messages or self._upgraded or self._payload_parser is not None:
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
        super().connection_lost(exc)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            # The C parser reports the start of what overflowed: a target starts with '/'.
            line = exc.args[0] if exc.args else b""
            if isinstance(line, bytes | str) and line[:1] in (b"/", "/"):
                resp = web.Response(status=414, text="414 URI Too Long\n", headers=_SERVER)
                resp.force_close()
                return resp
            resp = web.Response(status=431, text="431 Request Header Fields Too Large\n",
                                headers=_SERVER)
            resp.force_close()
            return resp
        if status == 400:
            # Parse errors: say so briefly; the details are for the log, not the client.
            log.info("rejected a malformed request from %s: %s", getattr(request, "remote", "?"),
                     exc)
            resp = web.Response(status=400, text="400 Bad Request\n", headers=_SERVER)
            resp.force_close()
            return resp
        return super().handle_error(request, status, exc, message)


class GatewayServer(web.Server):
    """aiohttp's server, making the gateway's protocol for each connection."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], *,
                 client_header_timeout: float,
                 protocol: type[RequestHandler] = _GatewayRequestHandler,
                 gateway: Any = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.client_header_timeout = client_header_timeout
        self.protocol = protocol
        self.gateway = gateway

    def __call__(self) -> RequestHandler:
        return self.protocol(self, loop=self._loop, **self._kwargs)


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
        if self._aserver is not None:
            await self._aserver.wait_closed()


def install_signal_handlers(stop: asyncio.Event, reload: Callable[[], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
