"""The upstream leg: pooled keep-alive HTTP/1.1 connections driven by aiohttp's C parser.

``ClientSession`` does a great deal per request (cookie handling, redirects, tracing,
connector bookkeeping, a fresh ``ClientResponse``) that a reverse proxy never uses; most of
the textbook aiohttp proxy's cost is there. This module keeps only what a proxy needs: a
protocol per connection, ``HttpResponseParser`` to frame responses, aiohttp's
``StreamReader`` (with its flow control) for bodies, and an idle pool per upstream.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.streams import StreamReader

from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamTLSError
from gateway.routing import Upstream

log = logging.getLogger("gateway.upstream")

_READ_LIMIT = 2**16

# on_head(message, payload, None) on success, on_head(None, None, error) on failure.
OnHead = Callable[[RawResponseMessage | None, StreamReader | None, UpstreamError | None], None]


class UpstreamConnection(BaseProtocol):
    """One TCP (or TLS) connection to an upstream; one exchange at a time."""

    __slots__ = (
        "_exchange_done",
        "_head",
        "_idle_since",
        "_keep_parser",
        "_last_read",
        "_on_head",
        "_parser",
        "_payload",
        "_pool",
        "_read_timeout",
        "key",
        "reused",
        "tail",
        "tunnel",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: UpstreamPool,
                 key: tuple[str, int, bool]) -> None:
        super().__init__(loop)
        self._pool = pool
        self.key = key
        self._parser: HttpResponseParser | None = None
        self._head: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._on_head: OnHead | None = None
        self._keep_parser: HttpResponseParser | None = None
        self._payload: StreamReader | None = None
        self._read_timeout = 0.0
        self._last_read = 0.0
        self._idle_since = 0.0
        self._exchange_done = True
        self.reused = False
        # After a 101, bytes go straight to this callback (the WebSocket splice).
        self.tunnel: Callable[[bytes], None] | None = None
        self.tail = b""

    # -------------------------------------------------------------- exchange

    def _begin(self, head: bytes, method: str, read_timeout: float) -> None:
        self._exchange_done = False
        self._idle_since = 0.0
        if method == "HEAD":
            # A HEAD answer has no body whatever its headers say: a parser of its own.
            self._parser = HttpResponseParser(
                self, self._loop, _READ_LIMIT, response_with_body=False,
                read_until_eof=True, auto_decompress=False,
            )
        else:
            # llhttp starts a new message after a complete one; one parser per connection.
            parser = self._keep_parser
            if parser is None:
                parser = self._keep_parser = HttpResponseParser(
                    self, self._loop, _READ_LIMIT, read_until_eof=True, auto_decompress=False)
            self._parser = parser
        self._payload = None
        self._read_timeout = read_timeout
        assert self.transport is not None
        self.transport.write(head)

    def start(self, head: bytes, *, method: str, read_timeout: float
              ) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        """Send the request head (and any body already appended) and expect a response."""
        self._head = self._loop.create_future()
        self._on_head = None
        self._begin(head, method, read_timeout)
        return self._head

    def start_cb(self, head: bytes, *, method: str, read_timeout: float, on_head: OnHead) -> None:
        """Like ``start``, but the response head is handed to ``on_head`` synchronously from
        ``data_received`` (the fast path: no future, no extra loop iteration)."""
        self._head = None
        self._on_head = on_head
        self._begin(head, method, read_timeout)

    def arm_read_timeout(self) -> None:
        """Start counting upstream silence; called once the request has been sent."""
        if self._read_timeout > 0:
            self._last_read = self._loop.time()
            self._pool.watch(self)

    def check_timeout(self, now: float) -> None:
        """Called by the pool's ticker for connections in an exchange."""
        if self._exchange_done or self.transport is None:
            self._pool.unwatch(self)
            return
        # Time spent paused (the client reads slowly) is not the upstream's silence.
        if self._reading_paused:
            self._last_read = now
        elif now - self._last_read >= self._read_timeout:
            self._fail(UpstreamTimeout(f"upstream sent nothing for {self._read_timeout:g}s"))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise UpstreamError("upstream closed the connection while we were sending")
        await self._drain_helper()

    def _end_exchange(self) -> None:
        self._exchange_done = True
        self._pool.unwatch(self)
        self._parser = None
        self._head = None
        self._on_head = None
        self._payload = None

    def finish(self, *, reusable: bool) -> None:
        """End the exchange: back to the pool when clean, otherwise closed."""
        self._end_exchange()
        if reusable and self.transport is not None and not self.transport.is_closing():
            self._pool.release(self)
        else:
            self.close()

    def finish_for_tunnel(self) -> None:
        """The exchange became a WebSocket: no more HTTP framing or read timeout."""
        self._end_exchange()
        self._keep_parser = None  # idle WebSockets are many: keep nothing they do not use

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        # Whoever aborts has given up on the exchange: the connection_lost that follows
        # must not set an error on a head future no one will await (asyncio would log
        # "Future exception was never retrieved", e.g. on every chunked 413).
        head = self._head
        if head is not None and not head.done():
            head.cancel()
        if self.transport is not None:
            self.transport.abort()

    # -------------------------------------------------------------- protocol

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel(data)
            return
        parser = self._parser
        if parser is None:
            # Bytes outside an exchange: the upstream is not speaking HTTP/1.1 keep-alive
            # correctly. Never reuse this connection.
            self.abort()
            return
        self._last_read = self._loop.time()
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._fail(UpstreamError(f"upstream sent an invalid response: {exc.message}"))
            return
        except Exception as exc:  # the parser reports some framing errors this way
            self._fail(UpstreamError(f"upstream sent an invalid response: {exc}"))
            return
        if messages:
            message, payload = messages[0]
            if message.code < 200 and message.code != 101:
                # 1xx interim answers (100 Continue, 103) are not forwarded; wait for the real one.
                return
            self._payload = payload
            if upgraded:
                # Whatever follows the 101 belongs to the spliced protocol, not to HTTP.
                self.tail = tail
                self.tunnel = self._buffer_tail
            on_head = self._on_head
            if on_head is not None:
                self._on_head = None
                on_head(message, payload, None)
                return
            head = self._head
            if head is not None and not head.done():
                head.set_result((message, payload))

    def _buffer_tail(self, data: bytes) -> None:
        self.tail += data

    def eof_received(self) -> bool:
        if self.tunnel is None and self._parser is not None:
            try:
                self._parser.feed_eof()
            except HttpProcessingError as exc:
                self._fail(UpstreamError(f"upstream closed mid-response: {exc.message}"))
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._pool.forget(self)
        if not self._exchange_done:
            if self._parser is not None and self._payload is not None and exc is None:
                try:
                    self._parser.feed_eof()
                except HttpProcessingError:
                    pass
            if self._payload is None or not self._payload.is_eof():
                reason = f": {exc}" if exc else ""
                self._fail(UpstreamError(f"upstream closed the connection{reason}"))
        if self.tunnel is not None:
            self.tunnel(b"")

    def _fail(self, exc: UpstreamError) -> None:
        on_head = self._on_head
        head = self._head
        if on_head is not None:
            self._on_head = None
            self._exchange_done = True
            self.abort()
            on_head(None, None, exc)
            return
        if head is not None and not head.done():
            head.set_exception(exc)
        elif self._payload is not None and not self._payload.is_eof():
            self._payload.set_exception(exc)
        self._exchange_done = True
        self.abort()


class UpstreamPool:
    """Idle keep-alive connections per upstream, opened on demand with a connect timeout.

    One ticker per pool enforces read timeouts and idle expiry, instead of a timer per
    request: arming and cancelling timers was a measurable share of the hot path.
    """

    def __init__(self, *, connect_timeout: float, idle_timeout: float = 30.0,
                 max_idle_per_host: int = 256, tick: float = 0.25) -> None:
        self._idle: dict[tuple[str, int, bool], deque[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        self._watched: set[UpstreamConnection] = set()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle_per_host
        self.tick = tick
        self._ticker: asyncio.TimerHandle | None = None
        self._closed = False

    def watch(self, conn: UpstreamConnection) -> None:
        self._watched.add(conn)
        if self._ticker is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._ticker = loop.call_later(self.tick, self._on_tick)

    def unwatch(self, conn: UpstreamConnection) -> None:
        self._watched.discard(conn)

    def _on_tick(self) -> None:
        self._ticker = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self._watched):
            conn.check_timeout(now)
        limit = now - self.idle_timeout
        for idle in self._idle.values():
            while idle and idle[0]._idle_since < limit:
                idle.popleft().close()
        if (self._watched or any(self._idle.values())) and not self._closed:
            self._ticker = loop.call_later(self.tick, self._on_tick)

    def acquire_idle(self, up: Upstream) -> UpstreamConnection | None:
        """A pooled connection if one is idle (no await: the fast path needs this)."""
        idle = self._idle.get(up.key)
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    async def acquire(self, up: Upstream, *, fresh: bool = False) -> UpstreamConnection:
        if not fresh:
            conn = self.acquire_idle(up)
            if conn is not None:
                return conn
        return await self._connect(up)
    async def _connect(self, up: Upstream) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        key = up.key
        try:
            async with asyncio.timeout(self.connect_timeout or None):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConnection(loop, self, key), up.host, up.port,
                    ssl=up.ssl, server_hostname=up.host if up.ssl else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"connecting to {up.host}:{up.port} took over {self.connect_timeout:g}s"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamTLSError(
                f"TLS verification of {up.host}:{up.port} failed: {exc.verify_message}; "
                "set the route's ca_file to the CA that signed it"
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamTLSError(f"TLS with {up.host}:{up.port} failed: {exc.reason}") from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to {up.host}:{up.port}: {exc.strerror or exc}"
            ) from None
        self._all.add(proto)
        return proto

    def release(self, conn: UpstreamConnection) -> None:
        if self._closed:
            conn.close()
            return
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        if len(idle) >= self.max_idle:
            conn.close()
            return
        loop = conn._loop
        conn._idle_since = loop.time()
        idle.append(conn)
        if self._ticker is None:
            self._ticker = loop.call_later(self.tick, self._on_tick)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle:
            try:
                idle.remove(conn)
            except ValueError:
                pass

    async def close(self) -> None:
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)

    def stats(self) -> dict[str, Any]:
        return {"open": len(self._all), "idle": sum(len(d) for d in self._idle.values())}
