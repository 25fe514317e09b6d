"""The upstream leg: pooled keep-alive HTTP/1.1 connections and a strict response reader.

``ClientSession`` does a great deal per request (cookie handling, redirects, tracing,
connector bookkeeping, a fresh ``ClientResponse``) that a reverse proxy never uses. This
module keeps only what a proxy needs: a protocol per connection, a response reader, a body
buffer with flow control, and an idle pool per upstream.

A pooled connection carries one visitor's exchange after another's, so nothing read for
one exchange may be seen by the next. Every exchange gets a fresh ``ResponseReader``;
the connection keeps only transport state. Whatever the upstream sends that belongs to no
exchange (bytes after a complete response, a body on a 204/304/HEAD answer) marks the
connection broken: the exchange that was correct is still answered, and the connection is
closed instead of being pooled again. The reader is strict (RFC 9112): it frames what the
client will see, so a lenient reading here is a response-splitting hole. Interim (1xx)
answers are dropped, as current nginx does unless told to pass 103 on (the gateway answers
``Expect: 100-continue`` itself); trailers are dropped, never turned into headers.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamTLSError
from gateway.routing import Upstream

log = logging.getLogger("gateway.upstream")

# Body bytes buffered for a slow client before the upstream is no longer read.
_HIGH_WATER = 2**16
# A chunk-size line (size and extensions) longer than this is not a real one.
_MAX_CHUNK_LINE = 4096
# Interim (1xx) answers to one request beyond this many are not a server at work (one
# 100 Continue and a 103 Early Hints or two are) but one that would hold the exchange open,
# a read timeout at a time, for as long as it likes: the exchange fails (502).
MAX_INTERIM = 32
DEFAULT_MAX_HEADER_SIZE = 16 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: |\r)")
# What a status line or a field may hold besides its CRLF: HTAB, printable ASCII, obs-text.
_FIELD_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
# Translation tables that turn every byte not allowed into NUL (itself never allowed): one
# pass with a fixed table, then a search for NUL, costs less than deleting the allowed bytes
# (``translate(None, allowed)`` builds its table on every call). The NUL is searched as the
# integer 0: ``bytes in bytes`` first tries its operand as an integer and pays for a
# TypeError when it is not one. (CR and LF become NUL too: counted against the CRLFs.)
_HEAD_CHECK = bytes(b if b in _FIELD_BYTES else 0 for b in range(256))
# A field name: a token (RFC 9110 5.6.2).
_TOKEN_CHECK = bytes(
    b if b in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    else 0 for b in range(256))
# A field line that does not start with a token right before its colon (RFC 9112 §5.1):
# this also finds obs-fold (a line starting with whitespace) and whitespace before the colon.
_BAD_FIELD_START = re.compile(rb"\r\n(?![!#$%&'*+\-.^_`|~0-9A-Za-z]+:)")
_CHUNK_LINE = re.compile(rb"([0-9a-fA-F]{1,15})(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?")
# len() of content-length, transfer-encoding, connection, date: the names parse_head reads.
_SPECIAL_LENGTHS = frozenset({14, 17, 10, 4})


class InvalidResponse(UpstreamError):
    """The upstream answered, but not in HTTP/1.1 (answered as 502, never retried: the
    request did reach the upstream)."""


class Response:
    """The head of the final response to one exchange.

    ``raw_headers`` are the upstream's field lines minus its framing (Content-Length,
    Transfer-Encoding): the gateway frames the body for its client itself, from ``length``.
    """

    __slots__ = ("_headers", "chunked", "code", "connection", "has_date", "length", "minor",
                 "raw_headers", "reason", "should_close", "upgrade")

    def __init__(self, code: int, reason: bytes, minor: int,
                 raw_headers: list[tuple[bytes, bytes]], length: int | None, chunked: bool,
                 connection: tuple[str, ...], should_close: bool, has_date: bool) -> None:
        self.code = code
        self.chunked = chunked
        self.reason = reason
        self.minor = minor
        self.raw_headers = raw_headers
        self.length = length
        self.connection = connection
        self.should_close = should_close
        self.has_date = has_date
        self.upgrade = code == 101
        self._headers: CIMultiDictProxy[str] | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The fields as a case-insensitive mapping (built on first use: the hot path
        works on ``raw_headers``)."""
        if self._headers is None:
            self._headers = CIMultiDictProxy(CIMultiDict(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers))
        return self._headers


def parse_head(head: bytes) -> Response:
    """One response head (status line and field lines, each ending in CRLF, without the
    blank line). Raises ``InvalidResponse`` for anything RFC 9112 does not allow."""
    m = _STATUS_LINE.match(head)
    if m is None:
        raise InvalidResponse("upstream sent an invalid status line")
    line_end = head.find(b"\r\n")
    # Every CR and LF is part of a CRLF, and no other control character is anywhere.
    # (A NUL for each CR and LF of every CRLF, and none for anything else.)
    if head.translate(_HEAD_CHECK).count(0) != 2 * head.count(b"\r\n"):
        raise InvalidResponse("upstream sent a bare CR or LF or a control character")
    minor = 1 if m[1] == b"1" else 0
    raw: list[tuple[bytes, bytes]] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[str] = []
    has_date = False
    for line in head[line_end + 2:-2].split(b"\r\n") if len(head) > line_end + 2 else ():
        name, colon, value = line.partition(b":")
        if not name or not colon:
            raise InvalidResponse("upstream sent an invalid header line")
        # Optional whitespace: SP and HTAB (the other bytes strip() takes are refused above).
        value = value.strip()
        if len(name) in _SPECIAL_LENGTHS:  # most names are none of these: no lower()
            lname = name.lower()
            if lname == b"content-length":
                lengths += value.split(b",")
                continue
            if lname == b"transfer-encoding":
                codings += value.split(b",")
                continue
            if lname == b"connection":
                text = value.decode("latin-1")
                if "," in text:
                    connection += [t.strip(" \t").lower() for t in text.split(",")]
                else:  # the usual one token (value is stripped already)
                    connection.append(text.lower())
            elif lname == b"date":
                has_date = True
        raw.append((name, value))
    # Each name a token right before its colon (RFC 9112 5.1): this also refuses obs-fold
    # (a line starting with whitespace) and whitespace before the colon. (The names read
    # above and not kept are tokens: they equal one.)
    if raw and 0 in b"".join([name for name, _ in raw]).translate(_TOKEN_CHECK):
        raise InvalidResponse("upstream sent an invalid header line")
    code = int(m[2])
    length: int | None = None
    if lengths:
        # RFC 9110 §8.6: repeated identical values may be taken as one; anything else is
        # the classic response-splitting vector.
        first = lengths[0].strip(b" \t")
        if len(lengths) > 1 and any(v.strip(b" \t") != first for v in lengths):
            raise InvalidResponse("upstream sent conflicting Content-Length values")
        if not first.isdigit() or len(first) > 15:  # (bytes.isdigit: ASCII digits only)
            raise InvalidResponse("upstream sent an invalid Content-Length")
        length = int(first)
    chunked = False
    if codings:
        if lengths:
            raise InvalidResponse("upstream sent both Content-Length and Transfer-Encoding")
        if [c.strip(b" \t").lower() for c in codings] != [b"chunked"]:
            # Another transfer coding would be silently lost in re-chunking.
            raise InvalidResponse("upstream sent a Transfer-Encoding other than chunked")
        chunked = True
    if minor == 1:
        should_close = "close" in connection
    else:
        should_close = "keep-alive" not in connection
    if length is None and not chunked and code >= 200 and code not in (204, 304):
        should_close = True  # the body ends when the upstream closes
    return Response(code, head[13:line_end], minor, raw, length, chunked, tuple(connection),
                    should_close, has_date)


class Body:
    """The body of one response as it arrives: buffered up to a high-water mark, past which
    the upstream is no longer read until the consumer (the client's pace) takes it."""

    __slots__ = ("_buf", "_conn", "_exc", "_size", "_waiter", "done")

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        self._buf: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self.done = False  # every byte of the body has arrived

    def feed(self, data: bytes) -> None:
        self._buf.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER:
            self._conn.pause_reading()
        if self._waiter is not None:  # (usually no one waits yet: no call then)
            self._wake()

    def finish(self) -> None:
        self.done = True
        if self._waiter is not None:
            self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take(self) -> bytes:
        """Everything buffered so far (the whole body once ``done``)."""
        buf = self._buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        if self._size > _HIGH_WATER:
            self._conn.resume_reading()
        self._size = 0
        return data

    async def readany(self) -> bytes:
        """The next bytes of the body; b"" at its end. Raises the upstream's error if the
        body broke off."""
        while not self._buf:
            if self._exc is not None:
                raise self._exc
            if self.done:
                return b""
            waiter = self._waiter = self._conn._loop.create_future()
            await waiter
        return self.take()


# Reader states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseReader:
    """Frames the answer to one exchange: any 1xx (dropped), then the final response and
    its body. Made anew for every exchange."""

    __slots__ = ("_buf", "_head_request", "_interim", "_limit", "_remaining", "_state",
                 "_trailer_size", "_upgrade", "body", "complete", "response", "stray", "tail")

    def __init__(self, body: Body, *, head_request: bool, upgrade: bool, limit: int) -> None:
        self._buf = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._trailer_size = 0
        self._interim = 0  # 1xx answers dropped so far
        self._head_request = head_request
        self._upgrade = upgrade
        self._limit = limit
        self.body = body
        self.response: Response | None = None
        self.stray = False  # bytes after the end of the response: the connection is unusable
        self.tail = b""  # after a 101: the first bytes of the upgraded protocol
        # The response is read to its end (the state is _DONE): a plain attribute, as the
        # connection asks on every read.
        self.complete = False

    @property
    def until_close(self) -> bool:
        return self._state == _UNTIL_CLOSE

    def feed(self, data: bytes) -> None:
        """Raises ``InvalidResponse``; the caller fails the exchange."""
        state = self._state
        if state == _LENGTH:
            # The usual case, a body with a Content-Length: no buffering, no copy.
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self.body.feed(data)
                return
            self.body.feed(data[:remaining] if len(data) > remaining else data)
            self._end(data[remaining:])
            return
        if state == _UNTIL_CLOSE:
            self.body.feed(data)
            return
        if state == _DONE:
            if data:
                self.stray = True
            return
        if state == _HEAD and not self._buf:
            # The usual case: the whole head (and often the body) in one read, no 1xx.
            end = data.find(b"\r\n\r\n")
            if 0 <= end <= self._limit - 4:
                response = parse_head(data[:end + 2])
                if response.code >= 200:
                    self.response = response
                    self._start_body(response, data[end + 4:])
                    return
        self._buf += data
        if state == _HEAD:
            self._read_head()
        if self._state in (_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS):
            self._read_chunked()

    def _read_head(self) -> None:
        buf = self._buf
        limit = self._limit
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > limit:
                    raise InvalidResponse(f"upstream response header is over {limit} bytes")
                if buf.count(b"\n") != buf.count(b"\r\n"):
                    raise InvalidResponse("upstream sent a bare LF in the response head")
                return
            if end + 4 > limit:
                raise InvalidResponse(f"upstream response header is over {limit} bytes")
            response = parse_head(bytes(buf[:end + 2]))
            del buf[:end + 4]
            if response.code >= 200 or response.code == 101:
                break
            # An interim answer (100, 102, 103...): dropped; wait for the final one.
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise InvalidResponse(f"upstream sent more than {MAX_INTERIM} interim (1xx) "
                                      "answers")
        rest = bytes(buf)
        buf.clear()
        self.response = response
        self._start_body(response, rest)

    def _start_body(self, response: Response, rest: bytes) -> None:
        """Frame the body of the final response; ``rest`` is what followed its head."""
        code = response.code
        if code == 101:
            if not self._upgrade:
                raise InvalidResponse("upstream switched protocols unasked")
            self.tail = rest
            self._state = _DONE
            self.complete = True
        elif self._head_request or code in (204, 304):
            if self._head_request and response.length is None:
                # The answer to a GET would have been streamed: the upstream may still be
                # running the handler whose body it does not send, and a next request on
                # this connection would wait for it (Node, uvicorn serve a connection's
                # requests in turn). A new connection costs less than that wait.
                response.should_close = True
            self._end(rest)
        elif response.chunked:
            self._state = _CHUNK_SIZE
            if rest:
                self._buf += rest
                self._read_chunked()
        elif response.length is not None:
            length = response.length
            if len(rest) >= length:
                # The whole body came with the head (the common small response).
                if length:
                    self.body.feed(rest[:length] if len(rest) > length else rest)
                self._end(rest[length:])
            else:
                self._remaining = length - len(rest)
                self._state = _LENGTH
                if rest:
                    self.body.feed(rest)
        else:
            self._state = _UNTIL_CLOSE
            if rest:
                self.body.feed(rest)

    def _read_chunked(self) -> None:
        buf = self._buf
        body = self.body
        while True:
            state = self._state
            if state == _CHUNK_DATA:
                if not buf:
                    return
                n = self._remaining
                if len(buf) <= n:
                    body.feed(bytes(buf))
                    self._remaining = n - len(buf)
                    buf.clear()
                    if self._remaining:
                        return
                else:
                    body.feed(bytes(buf[:n]))
                    del buf[:n]
                self._state = _CHUNK_END
                continue
            if state == _CHUNK_END:
                if len(buf) < 2:
                    if buf and buf[0] != 13:
                        raise InvalidResponse("upstream chunk not followed by CRLF")
                    return
                if buf[0] != 13 or buf[1] != 10:
                    raise InvalidResponse("upstream chunk not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
                continue
            # A line: a chunk size, or a trailer field (or the blank line that ends them).
            eol = buf.find(b"\r\n")
            if eol < 0:
                if b"\n" in buf or (state == _CHUNK_SIZE and len(buf) > _MAX_CHUNK_LINE):
                    raise InvalidResponse("upstream sent an invalid chunk size line")
                if state == _TRAILERS and self._trailer_size + len(buf) > self._limit:
                    raise InvalidResponse("upstream trailers are too big")
                return
            if state == _CHUNK_SIZE:
                m = _CHUNK_LINE.fullmatch(buf, 0, eol)
                if m is None:
                    raise InvalidResponse("upstream sent an invalid chunk size line")
                size = int(m[1], 16)
                del buf[:eol + 2]
                if size:
                    self._remaining = size
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
                continue
            # Trailer fields are checked for framing and dropped: never forwarded as
            # headers of anything.
            if eol == 0:
                del buf[:2]
                rest = bytes(buf)
                buf.clear()
                self._end(rest)
                return
            self._trailer_size += eol + 2
            if self._trailer_size > self._limit:
                raise InvalidResponse("upstream trailers are too big")
            # The rules of header lines (CRLF before, so a bare LF or CR is seen too).
            line = b"\r\n" + bytes(buf[:eol])
            if _BAD_FIELD_START.match(line) or line[2:].translate(None, _FIELD_BYTES):
                raise InvalidResponse("upstream sent an invalid trailer line")
            del buf[:eol + 2]

    def _end(self, rest: bytes) -> None:
        self._state = _DONE
        self.complete = True
        if rest:
            self.stray = True
        self.body.finish()

    def close(self) -> None:
        """The upstream closed the connection: the end of a close-delimited body."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self.complete = True
            self.body.finish()


# on_head(response, body, None) on success, on_head(None, None, error) on failure.
OnHead = Callable[[Response | None, Body | None, UpstreamError | None], None]


class UpstreamConnection(asyncio.Protocol):
    """One TCP (or TLS) connection to an upstream; one exchange at a time."""

    __slots__ = (
        "_broken",
        "_drain_waiter",
        "_exchange_done",
        "_head",
        "_idle_since",
        "_last_read",
        "_limit",
        "_loop",
        "_on_head",
        "_pool",
        "_read_timeout",
        "_reader",
        "_reading_paused",
        "_writing_paused",
        "key",
        "reused",
        "tail",
        "transport",
        "tunnel",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: UpstreamPool,
                 key: tuple[str, int, bool], max_header_size: int = DEFAULT_MAX_HEADER_SIZE
                 ) -> None:
        self._loop = loop
        self._pool = pool
        self.key = key
        self._limit = max_header_size
        self.transport: asyncio.Transport | None = None
        self._reader: ResponseReader | None = None
        self._head: asyncio.Future[tuple[Response, Body]] | None = None
        self._on_head: OnHead | None = None
        self._read_timeout = 0.0
        self._last_read = 0.0
        self._idle_since = 0.0
        self._exchange_done = True
        self._broken = False  # the upstream broke framing once: never reuse
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.reused = False
        # After a 101, bytes go straight to this callback (the WebSocket splice).
        self.tunnel: Callable[[bytes], None] | None = None
        self.tail = b""

    # -------------------------------------------------------------- exchange

    def _begin(self, head: bytes, method: str, read_timeout: float, upgrade: bool) -> None:
        self._exchange_done = False
        self._idle_since = 0.0
        self._reader = ResponseReader(Body(self), head_request=method == "HEAD",
                                      upgrade=upgrade, limit=self._limit)
        self._read_timeout = read_timeout
        assert self.transport is not None
        self.transport.write(head)

    def start(self, head: bytes, *, method: str, read_timeout: float, upgrade: bool = False
              ) -> asyncio.Future[tuple[Response, Body]]:
        """Send the request head (and any body already appended) and expect a response.
        ``upgrade``: the request asks to switch protocols, so a 101 is a final answer."""
        self._head = self._loop.create_future()
        self._on_head = None
        self._begin(head, method, read_timeout, upgrade)
        return self._head

    def start_cb(self, head: bytes, *, method: str, read_timeout: float, on_head: OnHead) -> None:
        """Like ``start``, but the response head is handed to ``on_head`` synchronously from
        ``data_received`` (the fast path: no future, no extra loop iteration)."""
        self._head = None
        self._on_head = on_head
        self._begin(head, method, read_timeout, False)

    def arm_read_timeout(self) -> None:
        """Start counting upstream silence; called once the request has been sent."""
        if self._read_timeout > 0:
            self._last_read = self._loop.time()
            self._pool.watch(self)

    def check_timeout(self, now: float) -> None:
        """Called by the pool's ticker for connections in an exchange."""
        reader = self._reader
        if self._exchange_done or self.transport is None or reader is None or reader.complete:
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
        if self._writing_paused:
            waiter = self._drain_waiter
            if waiter is None:
                waiter = self._drain_waiter = self._loop.create_future()
            await waiter

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _end_exchange(self) -> None:
        self._exchange_done = True
        self._pool.unwatch(self)
        self._head = None
        self._on_head = None

    def finish(self, *, reusable: bool) -> None:
        """End the exchange: back to the pool when clean, otherwise closed.

        Only a response read to its exact end, with nothing after it, leaves a connection
        that the next visitor can use; the caller's word alone is not enough.
        """
        reader = self._reader
        self._reader = None
        self._end_exchange()
        if (reusable and reader is not None and reader.complete and not reader.stray
                and not self._broken and self.transport is not None
                and not self.transport.is_closing()):
            if self._reading_paused:
                self.resume_reading()
            self._pool.release(self)
        else:
            self.close()

    def finish_for_tunnel(self) -> None:
        """The exchange became a WebSocket: no more HTTP framing or read timeout."""
        self._reader = None
        self._end_exchange()

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
        self._broken = True
        if self.transport is not None:
            self.transport.abort()

    # -------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (No TCP_NODELAY here: asyncio and uvloop set it on every TCP transport.)
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain(None)

    def _wake_drain(self, exc: BaseException | None) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel(data)
            return
        reader = self._reader
        if reader is None or reader.complete:
            # Bytes outside an exchange, or after the end of a response: the upstream is
            # not speaking HTTP/1.1 keep-alive correctly. Never reuse this connection; an
            # exchange still being answered from its buffered body finishes first.
            self._broken = True
            if reader is None:
                self.abort()
            return
        self._last_read = self._loop.time()
        had_head = reader.response is not None
        try:
            reader.feed(data)
        except InvalidResponse as exc:
            self._fail(exc)
            return
        if had_head:
            return
        response = reader.response
        if response is None:
            return  # the head is not complete yet (or only 1xx so far)
        if response.upgrade:
            # Whatever follows the 101 belongs to the spliced protocol, not to HTTP.
            self.tail = reader.tail
            self.tunnel = self._buffer_tail
        on_head = self._on_head
        if on_head is not None:
            self._on_head = None
            on_head(response, reader.body, None)
            return
        head = self._head
        if head is not None and not head.done():
            head.set_result((response, reader.body))

    def _buffer_tail(self, data: bytes) -> None:
        self.tail += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._wake_drain(ConnectionResetError("upstream connection lost") if exc else None)
        self._pool.forget(self)
        reader = self._reader
        if not self._exchange_done and reader is not None:
            if exc is None and reader.until_close:
                reader.close()
            if not reader.complete:
                reason = f": {exc}" if exc else ""
                if reader.response is None:
                    self._fail(UpstreamError(f"upstream closed the connection{reason}"))
                else:
                    self._fail(UpstreamError(f"upstream closed mid-response{reason}"))
        if self.tunnel is not None:
            self.tunnel(b"")
        # The exchange's objects point back at this connection: break the cycle so that a
        # lost connection (and an error with its traceback) is freed now, not at the next
        # full collection.
        self._reader = None
        self._head = None
        self._on_head = None

    def _fail(self, exc: UpstreamError) -> None:
        on_head = self._on_head
        head = self._head
        reader = self._reader
        if on_head is not None:
            self._on_head = None
            self._exchange_done = True
            self.abort()
            on_head(None, None, exc)
            return
        if head is not None and not head.done():
            head.set_exception(exc)
        elif reader is not None:
            reader.body.fail(exc)
        self._exchange_done = True
        self.abort()


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """How many connections one upstream gets (a route's ``max_connections``,
    ``max_idle``, ``idle_timeout``, ``queue_timeout``; shared by every route to it)."""

    # Open connections (in use, idle or being opened); past it requests queue, never refused.
    max_connections: int | None = None
    # Idle connections kept; None: as many as were in use within the last idle_timeout.
    max_idle: int | None = None
    idle_timeout: float = 30.0
    # How long a request queues for a connection; None: the connect timeout.
    queue_timeout: float | None = None


class _Host:
    """The pool's state for one upstream."""

    __slots__ = ("idle", "limits", "open", "waiters")

    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self.idle: deque[UpstreamConnection] = deque()
        self.open = 0  # connections open or being opened: what max_connections counts
        # Requests queued at max_connections, first come first served: each gets a
        # released connection, or None when a slot freed (the slot is then theirs).
        self.waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()


class UpstreamPool:
    """Keep-alive connections per upstream, opened on demand with a connect timeout.

    The pool is sized to the work: a connection that finished its exchange cleanly stays
    idle (up to ``max_idle`` when set) and is taken last-in first-out, so connections that
    the current load does not need sink to the bottom and are closed after ``idle_timeout``.
    What stays idle is therefore the peak concurrency of the last ``idle_timeout``: a crowd
    of 1,000 clients keeps about 1,000 upstream connections warm, instead of opening a new
    one for every request above a fixed cap, and once that crowd went (a second with a
    quarter of it or less connected, gateway/memory.py), those beyond the clients left are
    closed (``shed``). ``max_connections`` bounds what one upstream
    is asked to hold; requests past it wait in one queue (both request paths), and a
    request that waited ``queue_timeout`` is answered 504.

    One ticker per pool enforces read timeouts and idle expiry, instead of a timer per
    request: arming and cancelling timers was a measurable share of the hot path.
    """

    def __init__(self, *, connect_timeout: float, idle_timeout: float = 30.0,
                 max_idle_per_host: int | None = None, tick: float = 0.25,
                 max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self._hosts: dict[tuple[str, int, bool], _Host] = {}
        self._limits: dict[tuple[str, int, bool], PoolLimits] = {}
        self._default = PoolLimits(max_idle=max_idle_per_host, idle_timeout=idle_timeout)
        self._all: set[UpstreamConnection] = set()
        self._watched: set[UpstreamConnection] = set()
        self.connect_timeout = connect_timeout
        self.tick = tick
        self.max_header_size = max_header_size
        self.opened = 0  # connections opened since start (reuse shows as few of these)
        self._ticker: asyncio.TimerHandle | None = None
        self._closed = False

    def configure(self, key: tuple[str, int, bool], limits: PoolLimits) -> None:
        """The limits of the upstream ``key`` (``Upstream.key``); before it is used."""
        self._limits[key] = limits
        host = self._hosts.get(key)
        if host is not None:
            host.limits = limits

    def _host(self, key: tuple[str, int, bool]) -> _Host:
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(self._limits.get(key, self._default))
        return host

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
        idle_left = False
        for host in self._hosts.values():
            idle = host.idle
            limit = now - host.limits.idle_timeout
            # Oldest first: the connections the current load did not need.
            while idle and idle[0]._idle_since < limit:
                conn = idle.popleft()
                conn._idle_since = 0.0  # out of the idle queue: forget() need not look
                conn.close()
            idle_left = idle_left or bool(idle)
        if (self._watched or idle_left) and not self._closed:
            self._ticker = loop.call_later(self.tick, self._on_tick)

    def acquire_idle(self, up: Upstream) -> UpstreamConnection | None:
        """A pooled connection if one is idle (no await: the fast path needs this)."""
        host = self._hosts.get(up.key)
        if host is None:
            return None
        idle = host.idle
        while idle:
            conn = idle.pop()
            conn._idle_since = 0.0
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    async def acquire(self, up: Upstream, *, fresh: bool = False) -> UpstreamConnection:
        """An idle connection (unless ``fresh``), else a new one; at ``max_connections``,
        the first one released or the next free slot, waiting at most ``queue_timeout``."""
        if not fresh:
            conn = self.acquire_idle(up)
            if conn is not None:
                return conn
        host = self._host(up.key)
        cap = host.limits.max_connections
        if cap is not None and (host.open >= cap or host.waiters):
            conn = await self._queue(host, up, cap)
            if conn is not None:
                return conn
            # else: a slot freed and was reserved for this request
        else:
            host.open += 1
        try:
            return await self._connect(up)
        except BaseException:
            self._slot_freed(host)
            raise

    async def _queue(self, host: _Host, up: Upstream, cap: int) -> UpstreamConnection | None:
        waiter: asyncio.Future[UpstreamConnection | None] = (
            asyncio.get_running_loop().create_future())
        host.waiters.append(waiter)
        limit = host.limits.queue_timeout
        if limit is None:
            limit = self.connect_timeout
        try:
            async with asyncio.timeout(limit or None):
                return await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return waiter.result()  # handed over just as the time ran out
            raise UpstreamTimeout(
                f"no connection to {up.host}:{up.port} freed up within {limit:g}s "
                f"(max_connections {cap})") from None
        except BaseException:
            # The request was cancelled (its client went away): give back what it got.
            if waiter.done() and not waiter.cancelled():
                got = waiter.result()
                if got is None:
                    self._slot_freed(host)
                else:
                    self.release(got)
            raise
        finally:
            if not waiter.done() or waiter.cancelled():
                try:
                    host.waiters.remove(waiter)
                except ValueError:
                    pass

    def _slot_freed(self, host: _Host) -> None:
        """One connection of ``host`` is gone: the slot goes to the first request queued."""
        host.open -= 1
        waiters = host.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                host.open += 1
                waiter.set_result(None)
                return

    async def _connect(self, up: Upstream) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        key = up.key
        try:
            async with asyncio.timeout(self.connect_timeout or None):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConnection(loop, self, key, self.max_header_size),
                    up.host, up.port,
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
        if proto.transport is None:  # lost before this coroutine resumed
            raise UpstreamError(f"{up.host}:{up.port} closed the connection at once")
        self._all.add(proto)
        self.opened += 1
        return proto

    def release(self, conn: UpstreamConnection) -> None:
        """A connection that finished an exchange cleanly (or was never used): to the
        first request queued for its upstream, else idle."""
        if self._closed:
            conn.close()
            return
        host = self._host(conn.key)
        waiters = host.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                conn.reused = True
                waiter.set_result(conn)
                return
        max_idle = host.limits.max_idle
        if max_idle is not None and len(host.idle) >= max_idle:
            conn.close()
            return
        loop = conn._loop
        conn._idle_since = loop.time()
        host.idle.append(conn)
        if self._ticker is None:
            self._ticker = loop.call_later(self.tick, self._on_tick)

    def shed(self, keep: int) -> int:
        """Close idle connections beyond ``keep`` per upstream, the longest idle first
        (a crowd went: its idle connections would otherwise wait for ``idle_timeout``).
        Returns how many were closed."""
        closed = 0
        for host in self._hosts.values():
            idle = host.idle
            while len(idle) > keep:
                conn = idle.popleft()
                conn._idle_since = 0.0
                conn.close()
                closed += 1
        return closed

    def forget(self, conn: UpstreamConnection) -> None:
        host = self._hosts.get(conn.key)
        if conn in self._all:
            self._all.discard(conn)
            if host is not None:
                self._slot_freed(host)
        # Only a connection still idle is in the queue: a search of a crowd's worth of
        # idle connections for each one the ticker expires would cost O(n²).
        if host is not None and conn._idle_since and host.idle:
            try:
                host.idle.remove(conn)
            except ValueError:
                pass

    async def close(self) -> None:
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for host in self._hosts.values():
            while host.waiters:
                waiter = host.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(UpstreamError("the gateway is shutting down"))
            host.idle.clear()
        for conn in list(self._all):
            conn.close()
        await asyncio.sleep(0)

    def upstream_stats(self) -> list[tuple[str, int, int, int]]:
        """Per upstream (``http://host:port`` or ``https://...``): connections open or being
        opened, those of them idle, and requests queued for one (at ``max_connections``)."""
        return [(f"{'https' if tls else 'http'}://{host}:{port}", h.open, len(h.idle),
                 len(h.waiters)) for (host, port, tls), h in self._hosts.items()]

    def stats(self) -> dict[str, Any]:
        hosts = self._hosts.values()
        return {"open": len(self._all), "idle": sum(len(h.idle) for h in hosts),
                "waiting": sum(len(h.waiters) for h in hosts), "opened": self.opened}
