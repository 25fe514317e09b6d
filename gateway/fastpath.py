"""The hot path: plain proxied requests served without a task or a request object.

aiohttp's connection loop creates a Task, a ``BaseRequest``, a ``StreamWriter`` and a
response object for every request; for a proxy hop that only moves bytes, that machinery
costs more than the proxying. ``FastRequestHandler`` is aiohttp's per-connection protocol
with one addition: when aiohttp's loop is idle (parked on its waiter) and the next parsed
request is one the forwarding policy lets the lean path take (``ForwardingPolicy.lean``:
a proxied request with no body or a small Content-Length one, the guest chat POST whose
rewrite needs no I/O), the request is forwarded from ``data_received`` itself over an idle
pooled upstream connection (or, when none is idle, one a small task opens or queues for, as
the full path would) and the answer written from the upstream's callback. A body still
arriving is awaited here (``timeouts.client_body`` between reads) and sent with the head in
one write; no upstream connection is held while it arrives. Everything else (large or
chunked bodies, WebSockets, preflights, the gateway's own endpoints, pipelined requests
behind a slow one) goes through aiohttp's loop and ``app.Gateway.handle`` as before, so the
two paths never answer out of order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from gateway.aiohttp_adapter import RawRequestMessage, StreamReader, complete_body
from gateway.errors import ClientBodyTimeout, GatewayError, UpstreamError, UpstreamTimeout
from gateway.headers import Forwarded
from gateway.logs import log_fields
from gateway.policy import EMPTY_BODY_FRAMING, IDEMPOTENT, error_answer, log_error, render_error
from gateway.proxy import Exchange, cut_off, drain_client, framed_last, response_head
from gateway.routing import CompiledRoute
from gateway.server import _GatewayRequestHandler
from gateway.upstream import Body, InvalidResponse, Response, UpstreamConnection

if TYPE_CHECKING:
    from gateway.app import Gateway, Rewriter

log = logging.getLogger("gateway.fastpath")

class _Inline:
    """One request in flight on the fast path."""

    __slots__ = ("client_ip", "conn", "ex", "extras", "gw", "head", "head_request",
                 "keep_alive", "method", "minor", "opening", "raw_path", "rid", "route", "start",
                 "version")

    def __init__(self, gw: Gateway, route: CompiledRoute, msg: RawRequestMessage, ex: Exchange,
                 rid: str, client_ip: str, start: float) -> None:
        # The gateway this request started on (a reload swaps the server's), looked up once.
        self.gw = gw
        # The upstream connection and the bytes sent on it: set once the body is here.
        self.conn: UpstreamConnection | None = None
        self.head = b""
        self.route = route
        self.method = msg.method
        self.head_request = msg.method == "HEAD"
        self.raw_path = msg.path
        self.version = msg.version
        self.minor = msg.version.minor
        self.keep_alive = not msg.should_close
        self.ex = ex
        self.rid = rid
        self.client_ip = client_ip
        self.start = start
        self.extras: Sequence[tuple[str, str]] = ()
        # Opening (or queueing for) the upstream connection: cancelled if the client leaves.
        self.opening: asyncio.Task[None] | None = None


class _BodyWait:
    """The rest of a small request body awaited by the fast path."""

    __slots__ = ("last", "payload", "seen", "send", "timer", "total")

    def __init__(self, payload: StreamReader, send: Callable[[], None], now: float,
                 total: bool) -> None:
        self.payload = payload
        self.send = send
        self.last = now  # when body bytes last arrived (the start, for a ``total`` deadline)
        self.seen = payload.total_bytes
        self.total = total
        self.timer: asyncio.TimerHandle | None = None


class FastRequestHandler(_GatewayRequestHandler):
    _inline: _Inline | None = None
    _body_wait: _BodyWait | None = None
    _drained: asyncio.Future[None] | None = None
    _peer_ip: str | None = None

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.server.gateway
        return gateway

    def busy_elsewhere(self) -> bool:
        return self._inline is not None

    # ------------------------------------------------------------------ aiohttp hooks

    def data_received(self, data: bytes) -> None:
        # Hide aiohttp's waiter while parsing so that it is not woken for messages the fast
        # path may take; wake it ourselves for the ones it must serve.
        # (The client-header deadline of the parent class is kept here too, inline: this
        # runs once per request on the hot path.)
        queue = self.queue
        # Whether a request was already under way before these bytes (aiohttp's loop only
        # starts serving from its own task, never from parsing: it is asked below, when
        # the answer matters).
        was_busy = bool(queue) or self._inline is not None
        waiter = self.hide_waiter()
        try:
            self._parse(data)
        finally:
            if waiter is not None:
                self.restore_waiter(waiter)
        if self._body_wait is not None:
            self._body_arrived(self._body_wait)
        if queue or self.past_http:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            if queue:
                self._pump()
        elif not was_busy and not self.serving and data:
            self._arm_header_timer()

    def _pump(self) -> None:
        waiter = self.parked_waiter()
        messages = self.queue
        while (messages and self._inline is None and waiter is not None and not waiter.done()
               and not self.closing):
            msg, payload = messages[0]
            try:
                inlined = self._try_inline(msg, payload)
            except Exception as exc:  # odd input the fast path did not foresee: full path
                # The class only: an exception's text may quote the client's headers.
                log.debug("fast path declined a request (%s)", type(exc).__name__)
                self._drop_unsent()
                inlined = False
            if not inlined:
                waiter.set_result(None)
                return
            self.take()

    def _stop_body_wait(self) -> None:
        wait = self._body_wait
        if wait is not None:
            self._body_wait = None
            if wait.timer is not None:
                wait.timer.cancel()

    def _drop_unsent(self) -> None:
        """Forget a request this path took up but never sent (nor its awaited body)."""
        self._stop_body_wait()
        inline = self._inline
        if inline is not None:
            self._inline = None
            if inline.opening is not None:
                inline.opening.cancel()
            if inline.conn is not None:
                inline.conn.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_body_wait()
        inline = self._inline
        if inline is not None:
            if inline.opening is not None:
                inline.opening.cancel()  # the pool gives back its slot or its connection
            if inline.conn is not None:
                inline.conn.abort()
            self._done(inline, 499, error="client went away")
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109
        if self._inline is not None:
            self._drained = self.event_loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drained
            except TimeoutError:
                pass
        await super().shutdown(timeout)

    # ------------------------------------------------------------------ the fast path

    def _try_inline(self, msg: Any, payload: StreamReader) -> bool:
        if msg.__class__ is not RawRequestMessage:
            return False  # a refusal the parser layer queued
        gw = self.gateway
        policy = gw.policy
        headers = msg.headers
        lean = policy.lean(msg.method, msg.path, headers)
        if lean is None:
            return False
        route, target, length, rewriter, host = lean
        # From here on, the request is the policy's, exactly as on the full path.
        start = time.perf_counter()  # durations only: the loop clock may tick in whole ms
        peer = self._peer_ip
        if peer is None:
            name = self.peername
            peer = self._peer_ip = name[0] if isinstance(name, tuple) else ""
        fwd, rid, https = policy.client(peer, headers, host,
                                        headers.getall("X-Forwarded-For", ()))
        ex = Exchange()
        ex.https = https
        ex.headers = headers  # (attribute stores: cheaper than keyword arguments here)
        ex.transport = self.transport
        if gw.tracing is not None:
            ex.trace = gw.tracing.begin(headers, peer)
        inline = _Inline(gw, route, msg, ex, rid, fwd.client_ip, start)
        origin = headers.get("Origin")  # a browser's every POST carries one
        inline.extras = policy.proxied_extras(policy.cors_headers(origin) if origin else None)
        self._inline = inline
        if length and not payload.is_eof():
            # The body is still on its way: the request is this path's now, sent upstream
            # whole once the body is here (so an upstream never sees a cut-off request).
            self._await_body(payload, partial(self._send, inline, msg, payload, target, host,
                                              fwd, length, rewriter),
                             total=rewriter is not None)
            return True
        self._send(inline, msg, payload, target, host, fwd, length, rewriter, now=False)
        return True

    def _send(self, inline: _Inline, msg: RawRequestMessage, payload: StreamReader,
              target: str, host: str, fwd: Forwarded, length: int, rewriter: Rewriter | None,
              *, now: bool = True) -> None:
        """Head and body to the upstream in one write (or the refusal of the body)."""
        ex = inline.ex
        if length or rewriter is not None:
            body, body_type, refused = self._body(msg, payload, length, rewriter, ex)
        else:  # no body to read or rewrite (ex.bytes_in stays 0)
            body, body_type, refused = b"", None, None
        if ex.extra_response_headers:
            inline.extras = (*ex.extra_response_headers, *inline.extras)
        if refused is not None:
            if now:
                self._refuse(inline, refused)
            else:  # answered once this request has left aiohttp's queue (the caller takes it)
                self.event_loop.call_soon(self._refuse, inline, refused)
            return
        gw = inline.gw
        head = gw.policy.upstream_head(
            inline.route, msg.method, target, msg.raw_headers, host, fwd, inline.rid,
            msg.headers.getall("Connection", ()), trace=ex.trace,
            framing=_framing(msg.method, length, body), body_type=body_type)
        # One copy of each part: ``head += body`` would grow the bytearray, then copy it all.
        inline.head = b"".join((head, body)) if body else bytes(head)
        conn = gw.pool.acquire_idle(inline.route.upstream)
        if conn is None:
            # None idle: open one (or queue for one at max_connections) in a small task.
            # `_inline` is already set, so pipelined requests wait behind this one.
            inline.opening = self.event_loop.create_task(self._open(inline))
            inline.opening.add_done_callback(_log_task_error)
            return
        self._start(inline, conn)

    def _start(self, inline: _Inline, conn: UpstreamConnection) -> None:
        inline.conn = conn
        if conn.transport is None or conn.transport.is_closing():
            # Lost between being handed over and this task running. Nothing was sent on it,
            # so a fresh connection is safe whatever the method.
            conn.abort()
            if inline.ex.retried:
                self._write_error(inline, UpstreamError("upstream closed the connection"))
                return
            inline.ex.retried = True
            inline.opening = self.event_loop.create_task(self._retry(inline))
            inline.opening.add_done_callback(_log_task_error)
            return
        conn.start_cb(inline.head, method=inline.method,
                      read_timeout=inline.gw.proxy.settings.read_timeout,
                      on_head=partial(self._on_head, inline))
        conn.arm_read_timeout()

    async def _open(self, inline: _Inline) -> None:
        """A new upstream connection for ``inline``, then the request on it. (Cancelled by
        ``connection_lost`` if the client leaves meanwhile.)"""
        try:
            conn = await inline.gw.pool.acquire(inline.route.upstream)
        except UpstreamError as exc:
            inline.opening = None
            self._write_error(inline, exc)
            return
        inline.opening = None
        self._start(inline, conn)

    # ------------------------------------------------------------------ a body on its way

    def _await_body(self, payload: StreamReader, send: Callable[[], None], *,
                    total: bool) -> None:
        """Wait for the rest of a (small, Content-Length) body, as the full path reads it:
        at most ``timeouts.client_body`` between two reads (``total``: for the whole body,
        as a rewritten body is read)."""
        timeout = self.gateway.proxy.settings.client_body_timeout
        wait = _BodyWait(payload, send, self.event_loop.time(), total)
        if timeout:
            wait.timer = self.event_loop.call_later(timeout, self._body_timer, wait)
        self._body_wait = wait

    def _body_arrived(self, wait: _BodyWait) -> None:
        """After each read while a body is awaited (from ``data_received``)."""
        if not wait.payload.is_eof():
            if not wait.total and wait.payload.total_bytes != wait.seen:
                wait.seen = wait.payload.total_bytes
                wait.last = self.event_loop.time()
            return
        self._stop_body_wait()
        wait.send()
        # The read that completed the body may carry the next request, which the parser
        # keeps until asked to go on (a read of the body through aiohttp would ask): parse
        # it now, queued behind this one, without waking aiohttp's loop for it.
        waiter = self.hide_waiter()
        try:
            self._parse(b"")
        finally:
            if waiter is not None:
                self.restore_waiter(waiter)

    def _body_timer(self, wait: _BodyWait) -> None:
        if self._body_wait is not wait:
            return
        loop = self.event_loop
        timeout = self.gateway.proxy.settings.client_body_timeout
        due = wait.last + timeout
        if due > loop.time():
            wait.timer = loop.call_at(due, self._body_timer, wait)
            return
        self._body_wait = None
        inline = self._inline
        if inline is not None:
            inline.ex.bytes_in = wait.payload.total_bytes
            self._refuse(inline, ClientBodyTimeout("client body timeout"))

    def _body(self, msg: RawRequestMessage, payload: StreamReader, length: int,
              rewriter: Rewriter | None, ex: Exchange
              ) -> tuple[bytes, str | None, GatewayError | None]:
        """(the body to forward, its new type, or the error to answer instead): the client's
        body, already complete in memory, or the rewriter's version of it (the chat
        injection, exactly as the full path runs it: gateway/app.py)."""
        body = b""
        if length:
            taken = complete_body(payload)
            if taken is not None:
                body = taken
            else:
                # Reading lets aiohttp resume parsing (it re-enters data_received): hide its
                # loop's waiter meanwhile, so this request is not offered to either path again.
                waiter = self.hide_waiter()
                try:
                    body = payload.read_nowait(-1)
                finally:
                    if waiter is not None:
                        self.restore_waiter(waiter)
        ex.bytes_in = len(body)
        if rewriter is None:
            return body, None, None
        assert rewriter.now is not None  # the policy passes synchronous rewriters only
        try:
            body, extra = rewriter.now(msg.headers, body)
        except GatewayError as exc:
            return b"", None, exc
        if rewriter.signs:
            self.gateway.metrics.signatures += 1
        ex.extra_response_headers.extend(extra)
        ex.bytes_in = len(body)
        return body, rewriter.content_type, None

    def _refuse(self, inline: _Inline, exc: GatewayError) -> None:
        """The answer to a request refused before anything reached the upstream."""
        if self._inline is not inline:
            return  # the client went away meanwhile (its connection was dropped with it)
        # (Refused before an upstream connection was taken: nothing to give back.)
        self._write_error(inline, exc)

    def _on_head(self, inline: _Inline, message: Response | None,
                 payload: Body | None, exc: UpstreamError | None) -> None:
        if self._inline is not inline:
            return  # the client went away meanwhile
        conn = inline.conn
        assert conn is not None
        if exc is not None or message is None or payload is None:
            conn.abort()
            if (isinstance(exc, UpstreamError) and not isinstance(exc, UpstreamTimeout)
                    and not inline.ex.retried and inline.method in IDEMPOTENT
                    and (conn.reused or not isinstance(exc, InvalidResponse))):
                # Nothing reached the client yet and the method is idempotent (never a POST,
                # as on the full path): retry once on a fresh connection (typically a pooled
                # one the upstream had closed, or one with stray bytes from before).
                inline.ex.retried = True
                inline.opening = self.event_loop.create_task(self._retry(inline))
                inline.opening.add_done_callback(_log_task_error)
                return
            self._write_error(inline, exc if exc is not None else UpstreamError("no answer"))
            return
        self._respond(inline, message, payload)

    def _respond(self, inline: _Inline, message: Response, payload: Body) -> None:
        ex = inline.ex
        ex.upstream_status = message.code
        ex.upstream_time = time.perf_counter() - inline.start
        head, rechunk, keep_alive, no_body = response_head(
            message, inline.route, inline.version, inline.keep_alive, inline.head_request,
            inline.extras,
            b"X-Request-ID: %s\r\n" % inline.rid.encode(), https=ex.https,
            date=inline.gw.proxy.date)
        inline.keep_alive = keep_alive
        transport = self.transport
        conn = inline.conn
        assert conn is not None
        if transport is None or transport.is_closing():
            conn.abort()
            self._done(inline, 499, error="client went away")
            return
        if no_body or payload.done:
            data = b"" if no_body else payload.take()
            ex.bytes_out = len(data)
            transport.write(head + (framed_last(data) if rechunk else data))
            conn.finish(reusable=not message.should_close)
            self._done(inline, message.code)
            return
        transport.write(head)
        task = self.event_loop.create_task(self._stream(inline, message, payload, rechunk))
        task.add_done_callback(_log_task_error)

    async def _stream(self, inline: _Inline, message: Response, payload: Body,
                      rechunk: bool) -> None:
        """A body still on its way: stream it with flow control, as the full path does."""
        transport = self.transport
        out = 0
        ok = False
        try:
            while True:
                chunk = await payload.readany()
                if not chunk:
                    break
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client went away")
                out += len(chunk)
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if rechunk else chunk)
                if self.writing_paused:
                    await drain_client(self, inline.gw.proxy.settings.send_timeout)
            if rechunk and transport is not None:
                transport.write(b"0\r\n\r\n")
            ok = True
        except UpstreamError as exc:
            inline.ex.error = str(exc)
            log.warning("upstream broke off mid-response on %s: %s", inline.route.name, exc,
                        extra=log_fields(inline.ex))
        except ConnectionError as exc:
            inline.ex.error = str(exc) or "client went away"
        finally:
            inline.ex.bytes_out = out
            assert inline.conn is not None
            inline.conn.finish(reusable=ok and not message.should_close)
            if not ok:
                if transport is not None:
                    cut_off(transport, close_delimited=not inline.keep_alive and not rechunk
                            and message.length is None)
                inline.keep_alive = False
            self._done(inline, message.code)

    async def _retry(self, inline: _Inline) -> None:
        gw = inline.gw
        inline.conn = None
        try:
            conn = await gw.pool.acquire(inline.route.upstream, fresh=True)
            inline.conn = conn
            fut = conn.start(inline.head, method=inline.method,
                             read_timeout=gw.proxy.settings.read_timeout)
            conn.arm_read_timeout()
            message, payload = await fut
        except UpstreamError as exc:
            inline.opening = None
            if inline.conn is not None:
                inline.conn.abort()
            self._write_error(inline, exc)
            return
        inline.opening = None
        if self._inline is inline:
            self._respond(inline, message, payload)
        else:
            conn.abort()

    def _write_error(self, inline: _Inline, exc: GatewayError) -> None:
        """The policy's answer to ``exc``, as the full path gives it (gateway/policy.py)."""
        if self._inline is not inline:
            return  # the client went away meanwhile: its line is written already
        inline.ex.error = exc.error_field()
        log_error(log, inline.route, inline.rid, exc, log_fields(inline.ex))
        answer = error_answer(exc)
        if answer.close:
            inline.keep_alive = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(render_error(answer, inline.rid, minor=inline.minor,
                                         keep_alive=inline.keep_alive,
                                         head_request=inline.head_request,
                                         date_line=inline.gw.proxy.date.line()))
        inline.ex.bytes_out = 0 if inline.head_request else len(answer.body)
        self._done(inline, answer.status)

    def _done(self, inline: _Inline, status: int, *, error: str | None = None) -> None:
        if self._inline is not inline:
            return
        self._inline = None
        if error:
            inline.ex.error = error
        end = time.perf_counter()
        inline.gw.finished(inline.client_ip, inline.rid, inline.method, inline.raw_path,
                              inline.minor, status, inline.route, inline.ex,
                              end - inline.start, end)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not inline.keep_alive:
            self.force_close()
            return
        self.keep_alive_from_now()
        if self.queue:
            self._pump()


def _framing(method: str, length: int, body: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """The body's framing header for the upstream, as the full path sends it (proxy.py)."""
    if length or body:
        return ((b"Content-Length", b"%d" % len(body)),)
    if method in EMPTY_BODY_FRAMING:
        return ((b"Content-Length", b"0"),)
    return ()


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("fast path task failed", exc_info=task.exception())
