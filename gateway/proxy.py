"""Forwarding one request over a pooled upstream connection and streaming the answer back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from gateway.errors import PayloadTooLarge, UpstreamError, UpstreamTimeout
from gateway.headers import (
    HOP_BY_HOP,
    Forwarded,
    connection_tokens,
    rewrite_location,
    rewrite_refresh,
    rewrite_set_cookie,
    upstream_request_head,
)
from gateway.routing import CompiledRoute
from gateway.upstream import UpstreamConnection, UpstreamPool

log = logging.getLogger("gateway.proxy")

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_REWRITTEN = frozenset({b"set-cookie", b"location", b"refresh", b"content-location"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientBodyError(Exception):
    """The client's body broke off or stalled; nothing sensible can be forwarded."""


@dataclass(slots=True)
class Exchange:
    """What the access log and metrics want to know about one forwarded request."""

    upstream_status: int = 0
    upstream_time: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    retried: bool = False
    error: str = ""
    extra_response_headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    read_timeout: float
    client_body_timeout: float
    max_body: int  # 0 = unlimited


class Proxy:
    def __init__(self, pool: UpstreamPool, settings: ProxySettings) -> None:
        self.pool = pool
        self.settings = settings

    async def forward(self, request: web.BaseRequest, route: CompiledRoute, target: str,
                      fwd: Forwarded, request_id: str | None, ex: Exchange, *,
                      body: bytes | None = None,
                      cors: Sequence[tuple[str, str]] | None = None) -> web.StreamResponse:
        """Send ``request`` to ``route`` and stream the answer; ``body`` replaces the client's."""
        loop = asyncio.get_running_loop()
        method = request.method
        up = route.upstream
        host = request.host if route.preserve_host else up.host_header
        raw = request.raw_headers
        streaming = body is None and request.body_exists
        chunked = False
        framing: list[tuple[bytes, bytes]] = []
        if body is not None:
            framing.append((b"Content-Length", str(len(body)).encode()))
        elif streaming:
            length = request.content_length
            if length is None:
                chunked = True
                framing.append((b"Transfer-Encoding", b"chunked"))
            else:
                if self.settings.max_body and length > self.settings.max_body:
                    raise PayloadTooLarge(f"body of {length} bytes is over the limit")
                framing.append((b"Content-Length", str(length).encode()))
            if request.headers.get("Expect", "").lower() == "100-continue":
                assert request.transport is not None
                request.transport.write(_CONTINUE)
        elif method in ("POST", "PUT", "PATCH"):
            framing.append((b"Content-Length", b"0"))
        head = upstream_request_head(method, target, raw, host, fwd, request_id, framing)
        head += b"\r\n"
        if body:
            head += body
        attempts = 2 if (method in _IDEMPOTENT and not streaming) else 1
        started = loop.time()
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
                # A pooled connection the upstream closed while idle: retry once, fresh.
                if attempt + 1 < attempts and not isinstance(exc, UpstreamTimeout):
                    ex.retried = True
                    log.debug("retrying %s %s on a fresh connection: %s", method, target, exc)
                    continue
                raise
            except BaseException:
                if sender is not None:
                    sender.cancel()
                conn.abort()
                raise
            ex.upstream_time = loop.time() - started
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
                       conn: UpstreamConnection, message: RawResponseMessage,
                       payload: StreamReader, sender: asyncio.Task[int] | None, ex: Exchange,
                       cors: Sequence[tuple[str, str]] | None) -> web.StreamResponse:
        ex.upstream_status = message.code
        headers = response_headers(message.raw_headers, route)
        for name, value in ex.extra_response_headers:
            headers.add(name, value)
        if cors:
            for name, value in cors:
                headers[name] = value
        resp = web.StreamResponse(status=message.code, reason=message.reason, headers=headers)
        sent_all = False
        try:
            if payload.is_eof():
                # The whole body is already here (the common small response): headers and
                # body leave in one write.
                data = payload.read_nowait(-1) if not payload.at_eof() else b""
                await resp.prepare(request)
                await resp.write_eof(data)
                ex.bytes_out = len(data)
            else:
                await resp.prepare(request)
                out = 0
                while True:
                    chunk = await payload.readany()
                    if not chunk:
                        break
                    out += len(chunk)
                    await resp.write(chunk)
                ex.bytes_out = out
                await resp.write_eof()
            sent_all = True
        except UpstreamError as exc:
            # Headers are gone already: cut the client off so it can tell the body is short.
            ex.error = str(exc)
            log.warning("upstream broke off mid-response on %s: %s", route.name, exc)
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionError, asyncio.CancelledError):
            conn.abort()
            if sender is not None:
                sender.cancel()
            raise
        finally:
            if sender is not None and not sender.done():
                # The upstream answered before reading the whole body: the connection's
                # state is unknown, so it cannot be reused.
                sender.cancel()
                sent_all = False
            elif sender is not None and not sender.cancelled() and sender.exception() is None:
                ex.bytes_in = sender.result()
            conn.finish(reusable=sent_all and not message.should_close and not message.upgrade)
        return resp


def response_headers(raw: Sequence[tuple[bytes, bytes]], route: CompiledRoute) -> CIMultiDict[str]:
    """Upstream response headers as the client should see them."""
    tokens = connection_tokens(raw) if any(n.lower() == b"connection" for n, _ in raw) else ()
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in raw:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in tokens:
            continue
        text = value.decode("utf-8", "surrogateescape")
        if lname in _REWRITTEN:
            if lname == b"set-cookie":
                text = rewrite_set_cookie(text, route.urls)
            elif lname == b"refresh":
                text = rewrite_refresh(text, route.urls)
            else:
                text = rewrite_location(text, route.urls)
        headers.add(name.decode("latin-1"), text)
    return headers
