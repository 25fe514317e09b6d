"""The behaviours gateway/aiohttp_adapter.py relies on, pinned on both request paths.

The adapter reaches into aiohttp's connection loop (its request queue, its waiter, its
pipelining back-pressure, its keep-alive timer, flow control); an aiohttp release that
changes any of them must fail here before it reaches a deployment. Every test runs once
on the fast path and once on the full path (the ``path`` fixture, tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.fastpath import FastRequestHandler
from gateway.runtime import serving
from tests.conformance.harness import PathSwitch
from tests.support.gateway import ROUTES, GatewayFactory, build_config
from tests.support.process import wait_for
from tests.support.rawhttp import get, raw_exchange, read_all, read_response_head_and_body
from tests.support.upstreams import Echo

pytestmark = pytest.mark.usefixtures("path")

KEEP_ALIVE = b"GET %s HTTP/1.1\r\nHost: gw.test\r\n\r\n"


def served_as_expected(path: PathSwitch, marker: str) -> None:
    assert path.served_fast(marker) == (path.name == "fast"), path.taken[-5:]


async def warm(host: str, port: int) -> None:
    """Leave an idle pooled upstream connection behind: the fast path serves only then."""
    assert (await raw_exchange(host, port, get("/app/warm"))).status == 200


@pytest.mark.parametrize("count", [40, 1100])
async def test_pipelined_gets_beyond_the_queue_limit(gateway: GatewayFactory, path: PathSwitch,
                                                     count: int) -> None:
    """aiohttp stops reading at 32 queued requests and resumes as its loop drains them; a
    request taken outside that loop must resume it too. Every request gets its answer, in
    order (a stall here was the fast path's bug at 33)."""
    gw = await gateway()
    await warm(gw.host, gw.port)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    requests = b"".join(KEEP_ALIVE % b"/app/p%d" % i for i in range(count - 1))
    writer.write(requests + b"GET /app/last HTTP/1.1\r\nHost: gw.test\r\nConnection: close"
                 b"\r\n\r\n")
    try:
        data = await read_all(reader, 20)
    finally:
        writer.close()
    assert data.count(b"HTTP/1.1 200 ") == count
    positions = [data.index(b'"/up/p%d"' % i) for i in range(0, count - 1, 7)]
    assert positions == sorted(positions)
    assert data.rindex(b'"/up/last"') > positions[-1]
    served_as_expected(path, "/app/p1")


async def test_requests_that_arrive_before_the_connection_loop_first_runs(
        gateway: GatewayFactory, path: PathSwitch, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop may hand a new connection's first bytes to ``data_received`` before
    aiohttp's ``start()`` has run (it is a task, started from the next loop iteration before
    Python 3.12). The adapter parks it in advance: the fast path takes such a first request
    as it takes any other, and a request behind it waits its turn (``start()`` does not
    serve the second while the first is in flight)."""
    gw = await gateway()
    await warm(gw.host, gw.port)
    original = FastRequestHandler.connection_made
    early = (KEEP_ALIVE % b"/app/do/slow?delay=0.3&first"
             + b"GET /app/second HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")

    def made_then_data(handler: FastRequestHandler, transport: asyncio.BaseTransport) -> None:
        original(handler, transport)
        handler.data_received(early)  # in the same callback, as uvloop may do

    monkeypatch.setattr(FastRequestHandler, "connection_made", made_then_data)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        data = await read_all(reader, 10)
    finally:
        writer.close()
    assert data.count(b"HTTP/1.1 200 ") == 2, data[:300]
    assert data.index(b'"/up/do/slow"') < data.index(b'"/up/second"'), data
    served_as_expected(path, "first")


async def test_idle_keep_alive_connection_closed_after_the_timeout(
        gateway: GatewayFactory, path: PathSwitch) -> None:
    gw = await gateway(ROUTES + "timeouts: {keepalive: 400ms}\n")
    await warm(gw.host, gw.port)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    loop = asyncio.get_running_loop()
    try:
        writer.write(KEEP_ALIVE % b"/app/ka")
        head, _ = await read_response_head_and_body(reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        answered = loop.time()
        assert await read_all(reader, 5) == b""  # the gateway closed the idle connection
        idle = loop.time() - answered
    finally:
        writer.close()
    assert 0.3 < idle < 4.0, idle
    served_as_expected(path, "/app/ka")


async def test_keep_alive_timer_does_not_cut_a_request_in_progress(
        gateway: GatewayFactory, path: PathSwitch) -> None:
    """The fast path serves outside aiohttp's loop, which then looks idle: its keep-alive
    timer must not close a connection that is busy."""
    gw = await gateway(ROUTES + "timeouts: {keepalive: 300ms}\n")
    await warm(gw.host, gw.port)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(KEEP_ALIVE % b"/app/ka1")
        await read_response_head_and_body(reader)
        writer.write(KEEP_ALIVE % b"/app/do/slow?delay=0.9")
        head, body = await read_response_head_and_body(reader)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b'"/up/do/slow"' in body
    served_as_expected(path, "/app/do/slow")


async def test_a_client_that_stops_reading_is_held_back_then_dropped(
        gateway: GatewayFactory, path: PathSwitch) -> None:
    """Flow control: the body is not buffered for a client that reads nothing (writing
    pauses, the upstream is no longer read); after the send timeout the client is cut off
    short of the body. Without back-pressure all of it would sit in the socket buffers."""
    size = 32 * 1024 * 1024
    gw = await gateway(ROUTES + "timeouts: {send: 300ms}\n")
    await warm(gw.host, gw.port)
    reader, writer = await asyncio.open_connection(gw.host, gw.port, limit=1 << 16)
    try:
        writer.write(get(f"/app/do/download?n={size}"))
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(1.5)  # reads nothing, well past the send timeout
        got = 0
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(1 << 20):
                    got += len(chunk)
    finally:
        writer.close()
    assert got < size // 2, got
    served_as_expected(path, "/app/do/download")


async def test_shutdown_drains_a_request_in_flight(echo: Echo, path: PathSwitch) -> None:
    cfg = build_config(ROUTES + "timeouts: {shutdown_grace: 5s}\n", echo)
    ctx = serving(cfg)
    gw = await ctx.__aenter__()
    closing: asyncio.Future[bool | None] | None = None
    try:
        await warm(gw.host, gw.port)
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        writer.write(KEEP_ALIVE % b"/app/do/slow?delay=0.6")
        await wait_for(lambda: len(echo.seen) == 2, what="the slow request upstream")
        closing = asyncio.ensure_future(ctx.__aexit__(None, None, None))
        head, body = await read_response_head_and_body(reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b'"/up/do/slow"' in body
        assert await read_all(reader, 5) == b""  # then the connection closes
        writer.close()
    finally:
        if closing is None:
            await ctx.__aexit__(None, None, None)
        else:
            await closing
    served_as_expected(path, "/app/do/slow")
