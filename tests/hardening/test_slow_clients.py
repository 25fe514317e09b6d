"""Slow and greedy clients: each one bounded by a timeout, memory bounded, others served.

Every attack runs next to a well-behaved visitor making one request after another on fresh
connections; its latencies during the attack must stay low (loopback, 2 cores, other test
processes around: p99 under 200 ms is generous for a request that takes ~2 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.runtime import Running
from tests.support.gateway import GatewayStarter
from tests.support.process import wait_for
from tests.support.rawhttp import exchange, read_response
from tests.support.upstreams import RawRecorder, UpConn, UpRequest

LATENCY_P99 = 0.2


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@contextlib.asynccontextmanager
async def visitor(port: int) -> AsyncIterator[list[float]]:
    """A normal client in the background; yields the list its latencies are added to."""
    latencies: list[float] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def run() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                answers, _ = await exchange(
                    port, b"GET /visitor HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
                    limit_s=3)
                if [a.status for a in answers] != [200]:
                    failures.append(repr(answers))
            except (TimeoutError, ConnectionError, AssertionError) as exc:
                failures.append(repr(exc))
            latencies.append(time.monotonic() - start)
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(run())
    try:
        yield latencies
    finally:
        stop.set()
        await task
    assert not failures, failures[:5]
    assert len(latencies) >= 10, "the visitor hardly got through"


def assert_fast(latencies: list[float]) -> None:
    assert p99(latencies) < LATENCY_P99, (
        f"visitor p99 {p99(latencies) * 1000:.0f} ms, median "
        f"{statistics.median(latencies) * 1000:.1f} ms over {len(latencies)} requests")


async def wait_closed_by_peer(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the gateway closes the connection (reading whatever it sends)."""
    start = time.monotonic()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(limit):
            while await reader.read(65536):
                pass
    return time.monotonic() - start


# ------------------------------------------------------------------ slowloris


async def test_slowloris_headers_dropped_after_client_header_timeout(
        gw: Running, recorder: RawRecorder) -> None:
    request = b"GET /slow HTTP/1.1\r\nHost: gw.test\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"

    async def loris() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        start = time.monotonic()
        try:
            for i in range(len(request) - 1):  # never the final byte
                writer.write(request[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.05)
                if reader.at_eof():
                    break
            await wait_closed_by_peer(reader, 3)
        except ConnectionError:
            pass
        finally:
            writer.close()
        return time.monotonic() - start

    async with visitor(gw.port) as latencies:
        dropped_after = await asyncio.gather(*(loris() for _ in range(40)))
    assert all(0.9 <= t < 1.6 for t in dropped_after), sorted(dropped_after)[::8]
    assert_fast(latencies)
    assert not any(r.target == "/slow" for r in recorder.requests)


async def test_silent_connection_dropped_after_client_header_timeout(gw: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        took = await wait_closed_by_peer(reader, 3)
    finally:
        writer.close()
    assert 0.9 <= took < 1.6


async def test_slow_headers_of_a_second_keepalive_request_dropped(
        gw: Running, recorder: RawRecorder) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /first HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        first = await asyncio.wait_for(read_response(reader), 3)
        assert first is not None and first.status == 200
        await asyncio.sleep(0.5)  # idle keep-alive is not slowloris
        writer.write(b"GET /second HTTP/1.1\r\nHost: ")
        start = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for _ in range(40):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.05)
                if reader.at_eof():
                    break
        took = await wait_closed_by_peer(reader, 3) + (time.monotonic() - start)
    finally:
        writer.close()
    assert took < 1.8
    assert [r.target for r in recorder.requests] == ["/first"]


# ------------------------------------------------------------------ slow body


@pytest.mark.parametrize("client_body", [0.5, 1.5])
@pytest.mark.parametrize("framing", ["content_length", "chunked"])
async def test_stalled_body_cut_after_client_body_timeout(
        recorder: RawRecorder, start_gateway: GatewayStarter, client_body: float,
        framing: str) -> None:
    running = await start_gateway(recorder.url, timeouts={"client_body": f"{client_body}s"})
    if framing == "chunked":
        head = b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        part = b"a\r\n0123456789\r\n"
    else:
        head = b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 100\r\n\r\n"
        part = b"0123456789"

    async def stalled() -> tuple[float, bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        try:
            writer.write(head + part)
            start = time.monotonic()
            status_line = await asyncio.wait_for(reader.readline(), client_body + 3)
            answered = time.monotonic() - start
            closed = await wait_closed_by_peer(reader, 4) + answered
        finally:
            writer.close()
        return answered, status_line, closed

    async with visitor(running.port) as latencies:
        results = await asyncio.gather(*(stalled() for _ in range(20)))
    for answered, status_line, closed in results:
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        assert client_body - 0.1 <= answered < client_body + 0.6, answered
        assert closed < client_body + 3.0  # includes aiohttp's 2 s lingering close
    assert_fast(latencies)
    # The upstream got the head and a partial body, never a complete request.
    assert not any(r.target == "/upload" for r in recorder.requests)
    assert all(c.closed for c in recorder.conns if b"/upload" in c.raw)


async def test_trickling_body_completes_when_within_the_timeout(
        gw: Running, recorder: RawRecorder) -> None:
    """client_body bounds the silence between reads (as nginx's), not the whole upload."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"POST /trickle HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n\r\n")
        for b in b"hello":
            writer.write(bytes([b]))
            await asyncio.sleep(0.4)  # 2 s in all, each gap under the 1 s timeout
        resp = await asyncio.wait_for(read_response(reader), 3)
    finally:
        writer.close()
    assert resp is not None and resp.status == 200
    (req,) = recorder.requests
    assert req.body == b"hello"


# ------------------------------------------------------------------ greedy readers


HUGE = 1 << 30


def huge_download(state: dict[str, int]):  # type: ignore[no-untyped-def]
    """/huge streams 1 GiB; ``state`` counts bytes the upstream got rid of and live streams."""
    async def behaviour(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        if req.target != "/huge":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return True
        state["active"] += 1
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % HUGE)
            block = b"x" * 65536
            for _ in range(HUGE // len(block)):
                writer.write(block)
                await writer.drain()
                state["sent"] += len(block)
        finally:
            state["active"] -= 1
        return False
    return behaviour


async def start_greedy(port: int, n: int) -> list[tuple[asyncio.StreamReader,
                                                        asyncio.StreamWriter]]:
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /huge HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        await writer.drain()
        conns.append((reader, writer))
    return conns


async def test_client_that_never_reads_pauses_the_upstream(
        recorder: RawRecorder, start_gateway: GatewayStarter) -> None:
    state = {"sent": 0, "active": 0}
    recorder.behaviour = huge_download(state)
    # The send timeout is what drops such clients in the end (next test); not yet here.
    running = await start_gateway(recorder.url, timeouts={"send": "30s"})
    rss_before = rss_bytes()
    greedy = await start_greedy(running.port, 4)
    try:
        async with visitor(running.port) as latencies:
            await asyncio.sleep(2.0)
            sent_at_2s = state["sent"]
            await asyncio.sleep(1.0)
            sent_at_3s = state["sent"]
        assert state["active"] == 4, "every greedy download is still open (paused, not failed)"
        # Flow control end to end: the upstream is held back, not buffered into memory.
        assert sent_at_3s - sent_at_2s < 1 << 20, (sent_at_2s, sent_at_3s)
        assert sent_at_3s < 4 * (48 << 20), f"{sent_at_3s >> 20} MiB left the upstream"
        assert rss_bytes() - rss_before < 96 << 20
        assert_fast(latencies)
    finally:
        for _, writer in greedy:
            writer.close()


async def test_client_that_never_reads_is_dropped_after_a_timeout(
        recorder: RawRecorder, start_gateway: GatewayStarter) -> None:
    """A stalled reader must not hold a client and an upstream connection for ever: the
    gateway gives up once nothing could be sent for longer than its timeouts (all ≤ 2 s
    here; nginx has send_timeout for this)."""
    state = {"sent": 0, "active": 0}
    recorder.behaviour = huge_download(state)
    running = await start_gateway(recorder.url, timeouts={"keepalive": "2s"})
    greedy = await start_greedy(running.port, 2)
    try:
        await wait_for(lambda: state["active"] >= 2, 7, what="both downloads upstream")
        await wait_for(lambda: state["active"] == 0, 6.0, 0.1,
                       "the gateway to drop clients that read nothing for 6 s")
    finally:
        for _, writer in greedy:
            writer.close()
