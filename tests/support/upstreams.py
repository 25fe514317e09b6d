"""The upstreams tests put behind the gateway, each recording what it received.

- ``run_echo``: an aiohttp server on 127.0.0.1 port 0. By default it answers every request
  with JSON describing exactly what it received (method, raw target, headers as a list of
  pairs, body length and sha256, the peer port of the connection). Paths containing
  ``/do/<command>`` trigger special behaviour (downloads, cookies, redirects, WebSocket...),
  so one upstream serves every test, under any route prefix.
- ``raw_upstream``: a socket server answering every request head with canned bytes.
- ``run_recorder``: the strict raw recording upstream (below).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.rawhttp import Headers, exchange, get, raw_exchange

_BLOCK = bytes(range(256)) * 256  # 64 KiB download pattern
GZIP_BODY = gzip.compress(b"hello gzip, do not decompress me " * 200, mtime=0)

def pattern(n: int) -> bytes:
    """The first n bytes of the download pattern (for small downloads)."""
    reps = n // len(_BLOCK) + 1
    return (_BLOCK * reps)[:n]


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    full, rest = divmod(n, len(_BLOCK))
    for _ in range(full):
        h.update(_BLOCK)
    h.update(_BLOCK[:rest])
    return h.hexdigest()


class Target:
    """The path and the query of a request's ``target``."""

    target: str

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


@dataclass
class Seen(Headers, Target):
    """One request as the echo upstream received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body_len: int
    sha256: str
    peer_port: int
    version: str

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method, "target": self.target, "path": self.path,
            "query": self.query, "headers": self.headers, "body_len": self.body_len,
            "sha256": self.sha256, "peer_port": self.peer_port, "version": self.version,
        }


@dataclass
class Echo:
    host: str
    port: int
    seen: list[Seen] = field(default_factory=list)
    ws_closed: list[int | None] = field(default_factory=list)
    scheme: str = "http"
    started: list[str] = field(default_factory=list)  # targets whose head arrived

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _headers(request: web.BaseRequest) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]


async def _record(request: web.BaseRequest, echo: Echo, *, read_body: bool = True) -> Seen:
    h = hashlib.sha256()
    n = 0
    if read_body:
        async for chunk in request.content.iter_any():
            n += len(chunk)
            h.update(chunk)
    peer = request.transport.get_extra_info("peername") if request.transport else None
    seen = Seen(request.method, request.raw_path, _headers(request), n, h.hexdigest(),
                peer[1] if peer else 0, f"{request.version.major}.{request.version.minor}")
    echo.seen.append(seen)
    return seen


def make_echo_handler(echo: Echo) -> Handler:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        echo.started.append(request.raw_path)
        m = re.search(r"/do/([a-z_]+)", request.raw_path.partition("?")[0])
        cmd = m.group(1) if m else ""
        q = request.query
        if cmd == "ws":
            return await _ws(request, echo)
        if "pause" in q:  # a slow reader: the body waits in the gateway's flow control
            await asyncio.sleep(float(q["pause"]))
        seen = await _record(request, echo)
        if cmd == "download":
            n = int(q.get("n", "0"))
            resp = web.StreamResponse()
            if q.get("chunked") == "1":
                resp.enable_chunked_encoding()
            else:
                resp.content_length = n
            resp.content_type = "application/octet-stream"
            await resp.prepare(request)
            left = n if request.method != "HEAD" else 0  # aiohttp would send it anyway
            while left > 0:
                block = _BLOCK if left >= len(_BLOCK) else _BLOCK[:left]
                await resp.write(block)
                left -= len(block)
            await resp.write_eof()
            return resp
        if cmd == "chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(5):
                await resp.write(f"part{i};".encode())
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        if cmd == "gzip":
            return web.Response(body=GZIP_BODY, headers={
                "Content-Encoding": "gzip", "Content-Type": "text/plain"})
        if cmd == "cookie":
            host = request.host
            if not host.endswith("]"):
                host = host.rsplit(":", 1)[0]
            domain = q.get("domain", host)
            path = q.get("path", "/up/")
            resp = web.Response(text="cookies")
            resp.headers.add("Set-Cookie", f"ccmessaging-token=abc123; Domain={domain}; "
                                           f"Path={path}; HttpOnly; SameSite=Lax")
            resp.headers.add("Set-Cookie", "other=1; Domain=elsewhere.example; Path=/up/x")
            resp.headers.add("Set-Cookie", "plain=2")
            return resp
        if cmd == "redirect":
            to = q.get("to", "/up/next")
            base = f"{request.scheme}://{request.host}"
            location = to if q.get("relative") == "1" else base + to
            return web.Response(status=302, headers={
                "Location": location, "Refresh": f"0; url={base}{to}"})
        if cmd == "slow":
            await asyncio.sleep(float(q.get("delay", "1")))
            return web.json_response(seen.as_json())
        if cmd == "stall":
            # Headers at once, then the body only after a long pause.
            resp = web.StreamResponse()
            resp.content_length = 10
            await resp.prepare(request)
            await resp.write(b"12345")
            await asyncio.sleep(float(q.get("delay", "5")))
            await resp.write(b"67890")
            return resp
        if cmd == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(0.05)
            return web.Response(text="never sent")
        if cmd == "hop":
            resp = web.Response(text="hop")
            resp.headers["Connection"] = "keep-alive, X-Hop-Secret"
            resp.headers["X-Hop-Secret"] = "1"
            resp.headers["Keep-Alive"] = "timeout=5"
            resp.headers["Proxy-Authenticate"] = "Basic"
            resp.headers["X-End-To-End"] = "kept"
            return resp
        if cmd == "vary":
            return web.Response(text="vary", headers={"Vary": "Accept-Encoding"})
        if cmd == "status":
            return web.Response(status=int(q.get("code", "200")), text="status")
        return web.json_response(seen.as_json())

    return handler


async def _ws(request: web.BaseRequest, echo: Echo) -> web.StreamResponse:
    await _record(request, echo, read_body=False)
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            if msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]), message=b"bye")
                break
            await ws.send_str("echo:" + msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(b"echo:" + msg.data)
    echo.ws_closed.append(ws.close_code)
    return ws


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serve(target: Handler | web.Application, host: str = "127.0.0.1", *,
                ssl_context: ssl.SSLContext | None = None, **server_kwargs: Any
                ) -> AsyncIterator[int]:
    """An aiohttp server (a low-level handler or an Application) on ``host`` port 0 until the
    context ends; yields the port."""
    runner: web.BaseRunner = (
        web.AppRunner(target, access_log=None, shutdown_timeout=0.5)
        if isinstance(target, web.Application)
        else web.ServerRunner(web.Server(target, **server_kwargs), shutdown_timeout=0.5))
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    assert runner.addresses
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def run_echo(host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
                   ) -> AsyncIterator[Echo]:
    echo = Echo(host, 0, scheme="https" if ssl_context else "http")
    async with serve(make_echo_handler(echo), host, ssl_context=ssl_context,
                     auto_decompress=False) as echo.port:
        yield echo

async def echo_barrier(host: str, port: int, echo: Echo, path: str = "/app/after"
                       ) -> None:
    """A later request through the gateway, answered once the echo has recorded it: whatever
    an earlier (refused) request had sent upstream would have arrived before it."""
    before = len(echo.started)
    resp = await raw_exchange(host, port, get(path))
    assert resp.status == 200 and len(echo.started) > before, resp


# ------------------------------------------------------------------ canned raw upstreams


@dataclass
class RawUpstream:
    """A socket server that answers every request head with canned bytes (then maybe closes)."""

    port: int
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def raw_upstream(answer: bytes, *, close: bool = True, hold: bool = False
                       ) -> AsyncIterator[RawUpstream]:
    """``close``: answer once and close; else keep answering heads. ``hold``: answer once,
    then neither read nor close (an upstream that ignores the request body)."""
    up = RawUpstream(0)
    tasks: set[asyncio.Task[object]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                up.requests.append(head)
                writer.write(answer)
                await writer.drain()
                if hold:
                    await asyncio.sleep(3600)
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            tasks.discard(asyncio.current_task())

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


# ------------------------------------------------------------------ the strict raw recorder

# ``RawRecorder`` is an upstream that keeps every byte it receives per connection and parses
# request boundaries itself, strictly (CRLF only, token header names, one framing header,
# plain hex chunk sizes). Whatever the gateway forwards must pass this parser: a request the
# recorder cannot frame is a desync waiting for a laxer upstream, and it lands in ``errors``.
# Each well-formed request gets a fixed answer (or whatever a test's ``behaviour`` does).

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")
_CHUNK_SIZE = re.compile(rb"^([0-9a-fA-F]{1,15})(;[^\r\n\x00]*)?$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
MAX_HEAD = 64 * 1024


class StrictParseError(Exception):
    """What the gateway sent upstream is not a well-formed HTTP/1.1 request."""


@dataclass
class UpRequest(Headers, Target):
    """One request as the recording upstream framed it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes  # the exact bytes of this request, head and body
    seq: int = 0  # order of arrival over all connections

    @property
    def head(self) -> bytes:
        return self.raw[:self.raw.index(b"\r\n\r\n") + 4]

    def json(self) -> Any:
        return json.loads(self.body)


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
    received: int = 0  # requests framed so far, over all connections

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[UpRequest]:
        return [r for c in self.conns for r in c.requests]

    @property
    def errors(self) -> list[str]:
        return [f"conn {c.index}: {c.error}" for c in self.conns if c.error]

    def posts_to(self, path: str) -> list[UpRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path == path]

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

    async def wait_closed(self, conn: UpConn, limit: float = 3.0) -> None:
        async with asyncio.timeout(limit):
            while not conn.closed:
                self.arrived.clear()
                await self.arrived.wait()

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
                req.seq = self.received
                self.received += 1
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
async def run_recorder(behaviour: Behaviour | None = None, rec: RawRecorder | None = None
                       ) -> AsyncIterator[RawRecorder]:
    """Serve ``rec`` (a new recorder answering with ``behaviour``) until the context ends."""
    rec = rec or RawRecorder(behaviour=behaviour)
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
