"""Test helpers: the echo upstream, config building, and raw-socket HTTP.

The echo upstream is an aiohttp server on 127.0.0.1 port 0. By default it answers every
request with JSON describing exactly what it received (method, raw target, headers as a
list of pairs, body length and sha256, the peer port of the connection). Paths containing
``/do/<command>`` trigger special behaviour (downloads, cookies, redirects, WebSocket...),
so one upstream serves every test, under any route prefix.
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
import yaml
from aiohttp import web

from gateway.config import Config, load_config_text
from gateway.runtime import Running
from tests.support.rawhttp import get, raw_exchange

_BLOCK = bytes(range(256)) * 256  # 64 KiB download pattern
GZIP_BODY = gzip.compress(b"hello gzip, do not decompress me " * 200, mtime=0)

# Two routes over the echo: /app/ -> /up/ and / -> /root/.
ROUTES = """
routes:
  - prefix: /app/
    upstream: ${ECHO}/up/
  - prefix: /
    upstream: ${ECHO}/root/
"""


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


@dataclass
class Seen:
    """One request as the echo upstream received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body_len: int
    sha256: str
    peer_port: int
    version: str

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

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


def make_echo_handler(echo: Echo) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
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


@contextlib.asynccontextmanager
async def run_echo(host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
                   ) -> AsyncIterator[Echo]:
    echo = Echo(host, 0, scheme="https" if ssl_context else "http")
    server = web.Server(make_echo_handler(echo), auto_decompress=False)
    runner = web.ServerRunner(server, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    assert runner.addresses
    echo.port = runner.addresses[0][1]
    try:
        yield echo
    finally:
        await runner.cleanup()

GatewayFactory = Callable[..., Awaitable[Running]]

def build_config(yaml_text: str, echo: Echo, **env: str) -> Config:
    """Config from YAML with ``${ECHO}`` (the echo's base URL) and test-friendly defaults."""
    tree = yaml.safe_load(yaml_text) or {}
    listen = tree.setdefault("listen", {})
    listen.setdefault("host", "127.0.0.1")
    listen.setdefault("port", 0)
    tree.setdefault("timeouts", {}).setdefault("shutdown_grace", "2s")
    tree.setdefault("access_log", True)
    values = {"ECHO": echo.url, "ECHO_PORT": str(echo.port), **env}
    return load_config_text(yaml.safe_dump(tree), env=values)




async def echo_barrier(host: str, port: int, echo: Echo, path: str = "/app/after"
                       ) -> None:
    """A later request through the gateway, answered once the echo has recorded it: whatever
    an earlier (refused) request had sent upstream would have arrived before it."""
    before = len(echo.started)
    resp = await raw_exchange(host, port, get(path))
    assert resp.status == 200 and len(echo.started) > before, resp


def body_json(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(data)
    return result


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
