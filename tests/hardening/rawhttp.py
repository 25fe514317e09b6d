"""The raw recording upstream, for the hardening tests.

``RawRecorder`` is an upstream that keeps every byte it receives per connection and parses
request boundaries itself, strictly (CRLF only, token header names, one framing header,
plain hex chunk sizes). Whatever the gateway forwards must pass this parser: a request the
recorder cannot frame is a desync waiting for a laxer upstream, and it lands in ``errors``.
Each well-formed request gets a fixed answer (or whatever a test's ``behaviour`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from tests.support.rawhttp import exchange

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")
_CHUNK_SIZE = re.compile(rb"^([0-9a-fA-F]{1,15})(;[^\r\n\x00]*)?$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
MAX_HEAD = 64 * 1024


class StrictParseError(Exception):
    """What the gateway sent upstream is not a well-formed HTTP/1.1 request."""


@dataclass
class UpRequest:
    """One request as the recording upstream framed it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes  # the exact bytes of this request, head and body

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]


@dataclass
class UpConn:
    """One upstream connection: every byte received and the requests framed from them."""

    index: int
    raw: bytearray = field(default_factory=bytearray)
    requests: list[UpRequest] = field(default_factory=list)
    error: str | None = None
    closed: bool = False
    reader: asyncio.StreamReader | None = field(default=None, repr=False)

    async def wait_peer_close(self, limit: float) -> bool:
        """In a behaviour: True once the gateway closes this connection (within limit s)."""
        assert self.reader is not None
        try:
            async with asyncio.timeout(limit):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
                    self.raw += data
        except TimeoutError:
            return False
        except ConnectionError:
            return True


Behaviour = Callable[[UpRequest, "UpConn", asyncio.StreamWriter], Awaitable[bool]]


def fixed_response(req: UpRequest, seq: int) -> bytes:
    body = f"up:{seq}:{req.method} {req.target}\n".encode("latin-1")
    if req.method == "HEAD":
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
                % len(body))
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body))


@dataclass
class RawRecorder:
    """The recording upstream; ``behaviour`` may replace the fixed answer per test."""

    port: int = 0
    conns: list[UpConn] = field(default_factory=list)
    behaviour: Behaviour | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[UpRequest]:
        return [r for c in self.conns for r in c.requests]

    @property
    def errors(self) -> list[str]:
        return [f"conn {c.index}: {c.error}" for c in self.conns if c.error]

    def raw_bytes(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.conns)

    def assert_clean(self, *, at_most: int) -> list[UpRequest]:
        """Nothing malformed reached the upstream, and no more requests than the client sent."""
        assert not self.errors, f"upstream saw malformed bytes: {self.errors}"
        reqs = self.requests
        assert len(reqs) <= at_most, (
            f"upstream framed {len(reqs)} requests for {at_most} client request(s): "
            f"{[r.raw[:200] for r in reqs]}")
        return reqs

    async def pause(self, seconds: float) -> None:
        """Sleep in a behaviour; cut short when the recorder shuts down."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)

    async def wait_requests(self, n: int, limit: float = 3.0) -> list[UpRequest]:
        async with asyncio.timeout(limit):
            while len(self.requests) < n:
                self.arrived.clear()
                await self.arrived.wait()
        return self.requests

    # -------------------------------------------------------------- serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = UpConn(len(self.conns), reader=reader)
        self.conns.append(conn)
        self.writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        seq = 0
        try:
            while True:
                try:
                    req = await _read_request(reader, conn)
                except StrictParseError as exc:
                    conn.error = str(exc)
                    with contextlib.suppress(ConnectionError):
                        conn.raw += await asyncio.wait_for(reader.read(MAX_HEAD), 0.2)
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                    break
                if req is None:
                    break
                conn.requests.append(req)
                self.arrived.set()
                seq += 1
                if self.behaviour is not None:
                    if not await self.behaviour(req, conn, writer):
                        break
                else:
                    writer.write(fixed_response(req, seq))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            conn.closed = True
            self.arrived.set()
            self.writers.discard(writer)
            if task is not None:
                self.tasks.discard(task)
            writer.close()


async def _take(reader: asyncio.StreamReader, conn: UpConn, sep: bytes, what: str) -> bytes:
    try:
        data = await reader.readuntil(sep)
    except asyncio.IncompleteReadError as exc:
        conn.raw += exc.partial
        if exc.partial:
            raise StrictParseError(f"connection ended inside {what}: {exc.partial[:80]!r}"
                                   ) from None
        raise
    except asyncio.LimitOverrunError:
        raise StrictParseError(f"{what} too long") from None
    conn.raw += data
    return data


async def _exactly(reader: asyncio.StreamReader, conn: UpConn, n: int) -> bytes:
    try:
        data = await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        conn.raw += exc.partial
        raise StrictParseError(f"body cut short: {len(exc.partial)} of {n} bytes") from None
    conn.raw += data
    return data


async def _read_request(reader: asyncio.StreamReader, conn: UpConn) -> UpRequest | None:
    start = len(conn.raw)
    try:
        head = await _take(reader, conn, b"\r\n\r\n", "the request head")
    except asyncio.IncompleteReadError:
        return None  # clean close between requests
    lines = head[:-4].split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise StrictParseError(f"bare CR or LF in the head: {line[:80]!r}")
    m = _REQUEST_LINE.match(lines[0])
    if not m:
        raise StrictParseError(f"bad request line {lines[0][:120]!r}")
    method, target = m.group(1).decode(), m.group(2).decode("latin-1")
    version = lines[0].rsplit(b"/", 1)[1].decode()
    if not target.startswith("/"):
        raise StrictParseError(f"target not in origin form: {target!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise StrictParseError(f"obsolete line folding: {line[:80]!r}")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise StrictParseError(f"bad header line {line[:80]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise StrictParseError(f"control character in header {name!r}: {value[:80]!r}")
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    lower = [(k.lower(), v) for k, v in headers]
    hosts = [v for k, v in lower if k == "host"]
    if len(hosts) != 1:
        raise StrictParseError(f"{len(hosts)} Host headers")
    te = [v for k, v in lower if k == "transfer-encoding"]
    cl = [v for k, v in lower if k == "content-length"]
    if te and cl:
        raise StrictParseError("both Transfer-Encoding and Content-Length")
    body = b""
    if te:
        if te != ["chunked"]:
            raise StrictParseError(f"Transfer-Encoding other than one plain 'chunked': {te}")
        body = await _read_chunked(reader, conn)
    elif cl:
        if len(cl) != 1 or not cl[0].isdigit() or len(cl[0]) > 15:
            raise StrictParseError(f"bad Content-Length {cl}")
        body = await _exactly(reader, conn, int(cl[0]))
    return UpRequest(method, target, version, headers, body, bytes(conn.raw[start:]))


async def _read_chunked(reader: asyncio.StreamReader, conn: UpConn) -> bytes:
    body = bytearray()
    while True:
        line = (await _take(reader, conn, b"\r\n", "a chunk size line"))[:-2]
        m = _CHUNK_SIZE.match(line)
        if not m:
            raise StrictParseError(f"bad chunk size line {line[:80]!r}")
        size = int(m.group(1), 16)
        if size == 0:
            break
        body += await _exactly(reader, conn, size)
        if await _exactly(reader, conn, 2) != b"\r\n":
            raise StrictParseError("chunk data not followed by CRLF")
    while True:  # trailer section
        line = (await _take(reader, conn, b"\r\n", "the trailer section"))[:-2]
        if not line:
            return bytes(body)
        if b"\r" in line or b"\n" in line or b":" not in line:
            raise StrictParseError(f"bad trailer line {line[:80]!r}")


@contextlib.asynccontextmanager
async def run_recorder(behaviour: Behaviour | None = None) -> AsyncIterator[RawRecorder]:
    rec = RawRecorder(behaviour=behaviour)
    server = await asyncio.start_server(rec._serve, "127.0.0.1", 0, limit=MAX_HEAD)
    rec.port = server.sockets[0].getsockname()[1]
    try:
        yield rec
    finally:
        server.close()
        # Stalled behaviours wake up and every connection ends, so no handler is cancelled.
        rec.closing.set()
        for writer in list(rec.writers):
            writer.transport.abort()
        if rec.tasks:
            await asyncio.wait(list(rec.tasks), timeout=2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)


async def recorder_barrier(port: int, recorder: RawRecorder, target: str = "/after") -> None:
    """A later request through the gateway, answered once the recorder has framed it: whatever
    an earlier (refused) request had sent upstream would have arrived before it."""
    data = f"GET {target} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
    answers, _ = await exchange(port, data.encode())
    assert [a.status for a in answers] == [200], answers
    assert recorder.requests and recorder.requests[-1].target == target
