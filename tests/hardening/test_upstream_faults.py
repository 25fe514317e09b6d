"""Upstream faults: the client gets 502/504 or a cut-off it can detect, never a hang.

Timeouts are 1 s (``conftest.TIMEOUTS``), so every bound below is "the timeout plus a
second". Each test looks at the client's bytes and at what the recording upstream received
(how many times a request arrived says whether it was retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.hardening.test_smuggling import get
from tests.support.gateway import GatewayStarter
from tests.support.ports import busy_port
from tests.support.process import wait_for
from tests.support.rawhttp import RawResponse, exchange, read_response
from tests.support.upstreams import RawRecorder, UpConn, UpRequest

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def answer_ok(writer: asyncio.StreamWriter, req: UpRequest) -> bool:
    writer.write(OK if req.method != "HEAD" else OK[:-2])
    await writer.drain()
    return True


def cut_response(req: UpRequest, chunked: bool) -> bytes:
    if chunked:
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"
    return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"


async def timed_exchange(port: int, data: bytes, **kw: object) -> tuple[RawResponse, bool,
                                                                      float]:
    start = time.monotonic()
    answers, closed = await exchange(port, data, limit_s=6, **kw)  # type: ignore[arg-type]
    assert len(answers) == 1, answers
    return answers[0], closed, time.monotonic() - start


async def warm(port: int) -> None:
    """Leave one idle pooled upstream connection, so the next GET takes the fast path."""
    answers, _ = await exchange(port, get(b"Connection: close", target=b"/warm"))
    assert [a.status for a in answers] == [200]


# Requests for the two request paths: body-less GET (fast path once the pool is warm) and
# a POST (always aiohttp's loop and Gateway.handle).
PATHS = {
    "fast_get": get,
    "full_post": lambda target=b"/g": (b"POST " + target + b" HTTP/1.1\r\nHost: gw.test\r\n"
                                       b"Content-Length: 3\r\n\r\nabc"),
}


# ------------------------------------------------------------------ unreachable upstreams


async def test_refused_is_502(start_gateway: GatewayStarter) -> None:
    with busy_port(listen=False) as port:  # connections are refused
        running = await start_gateway(f"http://127.0.0.1:{port}/")
        for data in (get(), PATHS["full_post"]()):
            resp, _, took = await timed_exchange(running.port, data)
            assert resp.status == 502 and resp.complete
            assert b"127.0.0.1" not in resp.body
            assert took < 1.0


async def test_dns_failure_is_502(start_gateway: GatewayStarter) -> None:
    running = await start_gateway("http://nonexistent.invalid/")
    resp, _, took = await timed_exchange(running.port, get())
    assert resp.status == 502
    assert b"nonexistent" not in resp.body
    assert took < 2.5  # the connect timeout (1 s) covers name resolution too


@contextlib.asynccontextmanager
async def plain_tcp_server() -> AsyncIterator[int]:
    """Speaks plain HTTP whatever it is sent (a TLS ClientHello gets an HTTP 400)."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read(1024)
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_tls_failure_is_502(start_gateway: GatewayStarter) -> None:
    async with plain_tcp_server() as port:
        running = await start_gateway(f"https://127.0.0.1:{port}/")
        for data in (get(), PATHS["full_post"]()):
            resp, _, took = await timed_exchange(running.port, data)
            assert resp.status == 502
            assert took < 2.0


async def test_silent_upstream_is_504_after_the_read_timeout(
        recorder: RawRecorder, start_gateway: GatewayStarter) -> None:
    async def silent(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        await recorder.pause(30)
        return False

    recorder.behaviour = silent
    running = await start_gateway(recorder.url)
    resp, _, took = await timed_exchange(running.port, PATHS["full_post"]())
    assert resp.status == 504 and resp.complete
    assert 0.9 <= took < 2.5
    assert len(recorder.requests) == 1, "a timed-out POST is not retried"


async def test_upstream_garbage_is_502(recorder: RawRecorder,
                                       start_gateway: GatewayStarter) -> None:
    async def garbage(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        return False

    recorder.behaviour = garbage
    running = await start_gateway(recorder.url)
    resp, _, took = await timed_exchange(running.port, get())
    assert resp.status == 502 and took < 2.0
    assert b"SSH" not in resp.body


# ------------------------------------------------------------------ broken responses


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
@pytest.mark.parametrize("abort", [True, False], ids=["reset", "fin"])
@pytest.mark.parametrize("path", PATHS.keys())
async def test_upstream_dies_mid_response_client_detects_truncation(
        recorder: RawRecorder, start_gateway: GatewayStarter, path: str, chunked: bool,
        abort: bool) -> None:
    async def die(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        if req.target == "/warm":
            return await answer_ok(writer, req)
        writer.write(cut_response(req, chunked))
        await writer.drain()
        await asyncio.sleep(0.05)
        if abort:
            writer.transport.abort()
        return False

    recorder.behaviour = die
    running = await start_gateway(recorder.url)
    await warm(running.port)
    resp, closed, took = await timed_exchange(running.port, PATHS[path]())
    assert resp.status == 200
    assert not resp.complete, f"a truncated body must not look whole: {resp}"
    assert closed and took < 1.0
    if not chunked:
        assert resp.header("Content-Length") == "100"
    # Something reached the client: never retried.
    assert [r.target for r in recorder.requests] == ["/warm", "/g"]


async def test_truncation_detectable_by_http10_client(recorder: RawRecorder,
                                                      start_gateway: GatewayStarter) -> None:
    """An HTTP/1.0 client reads a chunked upstream body until the close; a cut must then
    end in a reset, not in the clean close that marks a complete body."""
    async def die(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        writer.write(cut_response(req, True))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()
        return False

    recorder.behaviour = die
    running = await start_gateway(recorder.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    try:
        writer.write(b"GET /g HTTP/1.0\r\nHost: gw.test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.0 200")
        assert b"content-length" not in head.lower()  # close-delimited body
        with pytest.raises(ConnectionResetError):
            while await asyncio.wait_for(reader.read(65536), 3):
                pass
    finally:
        writer.close()


@pytest.mark.parametrize("path", PATHS.keys())
async def test_never_ending_response_cut_after_read_timeout(
        recorder: RawRecorder, start_gateway: GatewayStarter, path: str) -> None:
    upstream_closed: list[float] = []

    async def stall(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        if req.target == "/warm":
            return await answer_ok(writer, req)
        writer.write(cut_response(req, False))
        await writer.drain()
        start = time.monotonic()
        if await conn.wait_peer_close(5):
            upstream_closed.append(time.monotonic() - start)
        return False

    recorder.behaviour = stall
    running = await start_gateway(recorder.url)
    await warm(running.port)
    resp, closed, took = await timed_exchange(running.port, PATHS[path]())
    assert resp.status == 200 and not resp.complete and closed
    assert resp.body == b"0123456789"
    assert 0.9 <= took < 2.5, took
    await wait_for(lambda: bool(upstream_closed), 2.5, what="the stalled upstream closed too")
    assert upstream_closed[0] < 2.5


@pytest.mark.parametrize("abort", [True, False], ids=["reset", "fin"])
async def test_websocket_upstream_vanishes_client_closed(
        recorder: RawRecorder, start_gateway: GatewayStarter, abort: bool) -> None:
    async def ws(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                     b"\r\n\x81\x02hi")
        await writer.drain()
        await asyncio.sleep(0.2)
        if abort:
            writer.transport.abort()
        return False

    recorder.behaviour = ws
    running = await start_gateway(recorder.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    try:
        start = time.monotonic()
        writer.write(get(b"Upgrade: websocket", b"Connection: Upgrade",
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                         b"Sec-WebSocket-Version: 13", target=b"/chat/ws"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 101")
        assert await asyncio.wait_for(reader.readexactly(4), 3) == b"\x81\x02hi"
        with contextlib.suppress(ConnectionResetError):
            rest = await asyncio.wait_for(reader.read(), 3)
            assert rest == b""
        assert time.monotonic() - start < 1.5
    finally:
        writer.close()
    (req,) = recorder.requests
    assert req.header("Upgrade") == "websocket"


# ------------------------------------------------------------------ retries


def close_on_second(log: list[tuple[int, str, str]]):  # type: ignore[no-untyped-def]
    """The second request on any connection is read and dropped unanswered (an upstream
    that closed a kept-alive connection just as the gateway reused it)."""
    async def behaviour(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        log.append((conn.index, req.method, req.target))
        if len(conn.requests) >= 2:
            return False
        return await answer_ok(writer, req)
    return behaviour


@pytest.mark.parametrize("headers", [(), (b"Origin: https://site.example",)],
                         ids=["fast_path", "full_path"])
async def test_idempotent_get_retried_once_on_a_fresh_connection(
        recorder: RawRecorder, start_gateway: GatewayStarter,
        headers: tuple[bytes, ...]) -> None:
    log: list[tuple[int, str, str]] = []
    recorder.behaviour = close_on_second(log)
    running = await start_gateway(recorder.url)
    await warm(running.port)
    resp, _, _ = await timed_exchange(running.port, get(*headers, target=b"/again"))
    assert (resp.status, resp.body) == (200, b"ok")
    # Once on the pooled connection (dropped), once on a new one.
    assert log == [(0, "GET", "/warm"), (0, "GET", "/again"), (1, "GET", "/again")]
    recorder.assert_clean(at_most=3)


async def test_get_retried_only_once(recorder: RawRecorder,
                                     start_gateway: GatewayStarter) -> None:
    attempts: list[int] = []

    async def drop_again(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        if req.target == "/warm":
            return await answer_ok(writer, req)
        attempts.append(conn.index)
        return False

    recorder.behaviour = drop_again
    running = await start_gateway(recorder.url)
    await warm(running.port)
    resp, _, took = await timed_exchange(running.port, get(target=b"/flaky"))
    assert resp.status == 502 and took < 1.0
    assert len(attempts) == 2 and attempts[0] != attempts[1]


@pytest.mark.parametrize("body", [b"", b"payload"], ids=["empty", "with_body"])
async def test_post_never_retried(recorder: RawRecorder, start_gateway: GatewayStarter,
                                  body: bytes) -> None:
    log: list[tuple[int, str, str]] = []
    recorder.behaviour = close_on_second(log)
    running = await start_gateway(recorder.url)
    await warm(running.port)
    data = (b"POST /order HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body))
    resp, _, _ = await timed_exchange(running.port, data)
    assert resp.status == 502
    posts = [entry for entry in log if entry[1] == "POST"]
    assert posts == [(0, "POST", "/order")], f"the upstream saw the POST {len(posts)} times"


async def test_slow_upstream_does_not_delay_other_clients(
        recorder: RawRecorder, start_gateway: GatewayStarter) -> None:
    async def slow(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        if req.target.startswith("/slow"):
            await recorder.pause(0.8)
        return await answer_ok(writer, req)

    recorder.behaviour = slow
    running = await start_gateway(recorder.url)
    slow_ones = [asyncio.ensure_future(
        exchange(running.port, get(b"Connection: close", target=b"/slow%d" % i)))
        for i in range(20)]
    await asyncio.sleep(0.1)
    latencies = []
    for _ in range(20):
        start = time.monotonic()
        answers, _ = await exchange(running.port, get(b"Connection: close", target=b"/fast"))
        latencies.append(time.monotonic() - start)
        assert [a.status for a in answers] == [200]
    assert max(latencies) < 0.2, latencies
    for fut in slow_ones:
        answers, _ = await fut
        assert [a.status for a in answers] == [200]


def test_cut_response_helper_is_truncated() -> None:
    """The fixtures' broken responses really are short (guards the tests above)."""
    req = UpRequest("GET", "/", "1.1", [], b"", b"")
    assert cut_response(req, False).endswith(b"0123456789")
    assert not cut_response(req, True).endswith(b"0\r\n\r\n")


async def test_read_response_reports_incomplete() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    reader.feed_eof()
    resp = await read_response(reader)
    assert resp is not None and not resp.complete and resp.body == b"ab"


# ------------------------------------------------------------------ invalid answers


@pytest.mark.parametrize("headers", [(), (b"Origin: https://site.example",)],
                         ids=["fast_path", "full_path"])
async def test_invalid_answer_on_a_reused_connection_retried_fresh(
        recorder: RawRecorder, start_gateway: GatewayStarter,
        headers: tuple[bytes, ...]) -> None:
    """What arrives on a pooled connection may be a stale exchange's stray bytes rather
    than the answer to this request: a GET is retried once on a new connection."""
    log: list[tuple[int, str]] = []

    async def stale_then_ok(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter
                            ) -> bool:
        log.append((conn.index, req.target))
        if conn.index == 0 and req.target != "/warm":
            writer.write(b"JUNK FROM BEFORE\r\n\r\n")
            await writer.drain()
            return await conn.wait_peer_close(2.0) and False
        return await answer_ok(writer, req)

    recorder.behaviour = stale_then_ok
    running = await start_gateway(recorder.url)
    await warm(running.port)
    resp, _, _ = await timed_exchange(running.port, get(*headers, target=b"/again"))
    assert (resp.status, resp.body) == (200, b"ok")
    assert log == [(0, "/warm"), (0, "/again"), (1, "/again")]


async def test_invalid_answer_on_a_fresh_connection_is_502_not_retried(
        recorder: RawRecorder, start_gateway: GatewayStarter) -> None:
    """On a new connection the invalid answer is the upstream's answer: 502, once."""
    async def invalid(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok")
        await writer.drain()
        return True

    recorder.behaviour = invalid
    running = await start_gateway(recorder.url)
    resp, _, took = await timed_exchange(running.port, get(target=b"/once"))
    assert resp.status == 502 and took < 1.0
    assert [r.target for r in recorder.requests] == ["/once"]
