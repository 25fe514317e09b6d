"""The upstream pool sized to the work, through a real gateway and a real recording upstream:
idle connections kept up to the concurrency served, ``max_connections`` with a queue, the
queue timeout, idle expiry, and the lean path opening a connection when none is idle.

Every test runs on both request paths (the ``path`` fixture); where the lean path is meant to
serve, the test checks that it did and that ``Gateway.handle`` (the full path) never ran.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config import load_config, load_config_text
from gateway.runtime import Running, serving
from tests.conformance.harness import PathSwitch
from tests.support.admin import metric, scrape
from tests.support.gateway import GatewayStarter
from tests.support.ports import free_port, unanswered_port
from tests.support.process import wait_for
from tests.support.rawhttp import RawResponse, exchange, get
from tests.support.upstreams import RawRecorder, UpConn, UpRequest, fixed_response, run_recorder

pytestmark = pytest.mark.usefixtures("path")

Behaviour = Callable[[UpRequest, UpConn, asyncio.StreamWriter], Awaitable[bool]]


@pytest.fixture
def full_path_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The raw path of every request ``Gateway.handle`` (the full path) served."""
    calls: list[str] = []
    original = Gateway.handle

    async def spy(self: Gateway, request: Any) -> Any:
        calls.append(request.raw_path)
        return await original(self, request)

    monkeypatch.setattr(Gateway, "handle", spy)
    return calls


def pool_config(upstream: str, *, admin: bool = False,
                timeouts: str = "{connect: 5s, read: 10s}", **route: Any) -> str:
    """One route to ``upstream`` with the route keys ``route`` (YAML)."""
    keys = "".join(f"\n    {k}: {v}" for k, v in route.items())
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
access_log: false
{"admin: {host: 127.0.0.1, port: 0}" if admin else ""}
timeouts: {timeouts}
routes:
  - prefix: /
    upstream: {upstream}/{keys}
"""


async def start(start_gateway: GatewayStarter, upstream: str, *, admin: bool = False,
                timeouts: str = "{connect: 5s, read: 10s}", **route: Any) -> Running:
    return await start_gateway(load_config_text(
        pool_config(upstream, admin=admin, timeouts=timeouts, **route), env={}))


async def fetch(gw: Running, target: str) -> RawResponse:
    answers, _ = await exchange(gw.port, get(target), limit_s=10.0)
    assert len(answers) == 1, answers
    return answers[0]


def lean_as_expected(path: PathSwitch, full_path_calls: list[str], marker: str) -> None:
    """On the fast path, every request with ``marker`` was served lean, none by the full path;
    on the full path, none was served lean."""
    mine = [taken for p, taken in path.taken if marker in p]
    assert mine, path.taken[-5:]
    if path.name == "fast":
        assert all(mine), path.taken[-10:]
        assert not [p for p in full_path_calls if marker in p], full_path_calls[-10:]
    else:
        assert not any(mine)


def gated(rec: RawRecorder, gate: asyncio.Event, *, hold_for: str = "") -> Behaviour:
    """Answers a request whose target contains ``hold_for`` only once ``gate`` is set."""
    async def behave(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        if hold_for in req.target:
            async with asyncio.timeout(10):
                await gate.wait()
        writer.write(fixed_response(req, len(conn.requests)))
        await writer.drain()
        return True

    return behave


async def until(check: Callable[[], bool]) -> None:
    """Wait for a state of the pool (which has no event of its own) to come true."""
    await wait_for(check, what="the pool's state")


async def one_connection_held(start_gateway: GatewayStarter, rec: RawRecorder
                              ) -> tuple[Running, asyncio.Event, asyncio.Future[RawResponse]]:
    """A gateway allowed one connection to ``rec``, held by a request to ``/held`` until the
    returned event is set."""
    gate = asyncio.Event()
    rec.behaviour = gated(rec, gate, hold_for="/held")
    gw = await start(start_gateway, rec.url, max_connections=1, queue_timeout="10s")
    held = asyncio.ensure_future(fetch(gw, "/held"))
    await rec.wait_requests(1)
    return gw, gate, held


async def test_cold_pool_requests_are_served_lean(
        start_gateway: GatewayStarter, path: PathSwitch, full_path_calls: list[str]) -> None:
    """No idle connection (a new gateway, then more requests at once than it has
    connections): the lean path opens one instead of handing the request to the full path."""
    async with run_recorder() as rec:
        gw = await start(start_gateway, rec.url)
        first = await fetch(gw, "/cold/first")
        assert first.status == 200 and first.body == b"up:1:GET /cold/first\n"
        answers = await asyncio.gather(*(fetch(gw, f"/cold/{i}") for i in range(20)))
        assert sorted(a.status for a in answers) == [200] * 20
        assert all(a.body.endswith(b"GET /cold/%d\n" % i) for i, a in enumerate(answers))
        lean_as_expected(path, full_path_calls, "/cold/")
        assert len(rec.requests) == 21
        assert gw.gateway.pool.stats()["opened"] == len(rec.conns)


async def test_idle_connections_follow_the_concurrency_served(
        start_gateway: GatewayStarter, path: PathSwitch, full_path_calls: list[str]) -> None:
    """300 requests in flight at once leave 300 idle connections (no fixed cap of 256),
    and the next 300 at once reuse them all: no new upstream connection."""
    n = 300
    async with run_recorder() as rec:
        gate = asyncio.Event()
        rec.behaviour = gated(rec, gate)
        gw = await start(start_gateway, rec.url)
        pool = gw.gateway.pool
        for round_ in (1, 2):
            gate.clear()
            before = len(rec.requests)
            answers = asyncio.gather(*(fetch(gw, f"/crowd{round_}/{i}") for i in range(n)))
            await rec.wait_requests(before + n, limit=15.0)  # all n in flight at once
            gate.set()
            assert sorted(a.status for a in await answers) == [200] * n
            await until(lambda: pool.stats()["idle"] == n)
            assert len(rec.conns) == n, round_
        lean_as_expected(path, full_path_calls, "/crowd")


async def test_max_connections_queues_and_answers_everyone(
        start_gateway: GatewayStarter, path: PathSwitch, full_path_calls: list[str]) -> None:
    """40 requests at once with max_connections 3: the upstream never holds more than 3
    connections, no request is refused, and each is answered with its own response."""
    in_flight = 0
    peak = 0

    async def slow(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        writer.write(fixed_response(req, len(conn.requests)))
        await writer.drain()
        return True

    async with run_recorder(slow) as rec:
        gw = await start(start_gateway, rec.url, max_connections=3, queue_timeout="10s")
        answers = await asyncio.gather(*(fetch(gw, f"/capped/{i}") for i in range(40)))
        assert [a.status for a in answers] == [200] * 40
        assert all(a.body.endswith(b"GET /capped/%d\n" % i) for i, a in enumerate(answers))
        assert len(rec.requests) == 40
        assert len(rec.conns) <= 3 and peak <= 3, (len(rec.conns), peak)
        assert peak == 3  # the cap was reached: the queue was used
        lean_as_expected(path, full_path_calls, "/capped/")


async def test_queue_timeout_answers_504(start_gateway: GatewayStarter, path: PathSwitch,
                                         full_path_calls: list[str]) -> None:
    """At max_connections, a request that waited queue_timeout for a connection gets the
    gateway's 504; the request holding the connection is still answered."""
    async with run_recorder() as rec:
        gate = asyncio.Event()
        rec.behaviour = gated(rec, gate, hold_for="/held")
        gw = await start(start_gateway, rec.url, max_connections=1, queue_timeout="200ms")
        held = asyncio.ensure_future(fetch(gw, "/held"))
        await rec.wait_requests(1)
        began = time.monotonic()
        late = await fetch(gw, "/queued")
        assert late.status == 504, late
        assert late.body == b"504 Gateway Timeout: the upstream did not answer in time\n"
        assert time.monotonic() - began >= 0.19
        gate.set()
        assert (await held).status == 200
        assert [r.target for r in rec.requests] == ["/held"]  # the queued one never went
        assert len(rec.conns) == 1
        lean_as_expected(path, full_path_calls, "/queued")


async def test_idle_connections_close_after_idle_timeout(
        start_gateway: GatewayStarter, path: PathSwitch, full_path_calls: list[str]) -> None:
    async with run_recorder() as rec:
        gw = await start(start_gateway, rec.url, idle_timeout="300ms")
        pool = gw.gateway.pool
        assert (await fetch(gw, "/once")).status == 200
        idle_from = time.monotonic()
        assert pool.stats()["idle"] == 1
        async with asyncio.timeout(5):
            while not rec.conns[0].closed:
                rec.arrived.clear()
                await rec.arrived.wait()  # set again when a connection ends
        assert time.monotonic() - idle_from >= 0.25
        assert pool.stats() == {"open": 0, "idle": 0, "waiting": 0, "opened": 1}
        # The next request opens a new connection, on the lean path too.
        assert (await fetch(gw, "/again")).status == 200
        assert len(rec.conns) == 2
        lean_as_expected(path, full_path_calls, "/again")


async def test_max_idle_caps_what_stays_idle(start_gateway: GatewayStarter, path: PathSwitch
                                             ) -> None:
    async with run_recorder() as rec:
        gate = asyncio.Event()
        rec.behaviour = gated(rec, gate)
        gw = await start(start_gateway, rec.url, max_idle=2)
        answers = asyncio.gather(*(fetch(gw, f"/few/{i}") for i in range(5)))
        await rec.wait_requests(5)
        gate.set()
        assert [a.status for a in await answers] == [200] * 5
        assert gw.gateway.pool.stats()["idle"] == 2
        await until(lambda: sum(not c.closed for c in rec.conns) == 2)


async def test_connect_refused_is_502_on_either_path(
        start_gateway: GatewayStarter, path: PathSwitch, full_path_calls: list[str]) -> None:
    gw = await start(start_gateway, f"http://127.0.0.1:{free_port()}")
    answer = await fetch(gw, "/refused")
    assert answer.status == 502, answer
    assert answer.body == b"502 Bad Gateway: the upstream could not be reached\n"
    assert gw.gateway.pool.stats()["open"] == 0
    lean_as_expected(path, full_path_calls, "/refused")


async def test_connect_timeout_is_504_on_either_path(
        start_gateway: GatewayStarter, path: PathSwitch, full_path_calls: list[str]) -> None:
    """An upstream that never completes the TCP handshake is the connect timeout's 504 (as
    nginx answers), on the lean path (which opens the connection itself) as on the full
    one; the slot the attempt took is given back."""
    with unanswered_port() as port:
        gw = await start(start_gateway, f"http://127.0.0.1:{port}",
                         timeouts="{connect: 300ms, read: 30s}")
        began = time.monotonic()
        answer = await fetch(gw, "/unanswered")
        took = time.monotonic() - began
    assert answer.status == 504, answer
    assert answer.body == b"504 Gateway Timeout: the upstream did not answer in time\n"
    assert 0.3 <= took < 5.0, took  # the connect timeout's, not the read timeout's
    assert gw.gateway.pool.stats()["open"] == 0
    lean_as_expected(path, full_path_calls, "/unanswered")


async def test_the_pool_state_per_upstream_is_in_the_metrics(
        start_gateway: GatewayStarter, path: PathSwitch, http: aiohttp.ClientSession) -> None:
    """/metrics shows, per upstream, the connections open and idle and the requests queued
    for one, as they are at the scrape; and the connections opened."""
    async with run_recorder() as rec:
        gate = asyncio.Event()
        rec.behaviour = gated(rec, gate, hold_for="/held")
        gw = await start(start_gateway, rec.url, admin=True, max_connections=1,
                         queue_timeout="10s")
        assert gw.runtime.admin_url is not None
        pool = gw.gateway.pool
        held = asyncio.ensure_future(fetch(gw, "/held"))
        await rec.wait_requests(1)
        queued = asyncio.ensure_future(fetch(gw, "/queued"))
        await until(lambda: pool.stats()["waiting"] == 1)
        text = await scrape(http, gw.runtime.admin_url)
        up = rec.url  # http://127.0.0.1:<port>
        assert metric(text, "gateway_upstream_connections_open", upstream=up) == 1
        assert metric(text, "gateway_upstream_connections_idle", upstream=up) == 0
        assert metric(text, "gateway_upstream_requests_queued", upstream=up) == 1
        gate.set()
        assert (await held).status == 200 and (await queued).status == 200
        await until(lambda: pool.stats()["idle"] == 1)
        text = await scrape(http, gw.runtime.admin_url)
        assert metric(text, "gateway_upstream_connections_open", upstream=up) == 1
        assert metric(text, "gateway_upstream_connections_idle", upstream=up) == 1
        assert metric(text, "gateway_upstream_requests_queued", upstream=up) == 0
        assert metric(text, "gateway_upstream_connections_opened_total") == 1


async def test_connections_opened_count_on_over_a_reload(
        tmp_path: Path, path: PathSwitch, http: aiohttp.ClientSession) -> None:
    """A reload builds a new pool; the counter of connections opened goes on from the old
    pool's count instead of starting again at 0."""
    async with run_recorder() as rec:
        config = tmp_path / "gateway.yaml"
        config.write_text(pool_config(rec.url, admin=True))
        async with serving(load_config(config), config_path=str(config)) as gw:
            assert gw.runtime.admin_url is not None
            assert (await fetch(gw, "/before")).status == 200
            assert await gw.runtime.reload()
            assert (await fetch(gw, "/after")).status == 200  # a new pool: a new connection
            text = await scrape(http, gw.runtime.admin_url)
    # (The health monitor's checks connect too, without a request.)
    assert len([c for c in rec.conns if c.requests]) == 2
    assert metric(text, "gateway_upstream_connections_opened_total") == 2


async def test_client_leaving_while_queued_gives_up_its_place(
        start_gateway: GatewayStarter, path: PathSwitch) -> None:
    """A client that goes away while its request waits for a connection takes nothing with
    it: its request is never sent, and the one connection serves the next client."""
    async with run_recorder() as rec:
        gw, gate, held = await one_connection_held(start_gateway, rec)
        pool = gw.gateway.pool
        _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(get("/gone"))
        await until(lambda: pool.stats()["waiting"] == 1)
        writer.close()
        await until(lambda: pool.stats()["waiting"] == 0)
        gate.set()
        assert (await held).status == 200
        after = await fetch(gw, "/after")
        assert after.status == 200
        assert [r.target for r in rec.requests] == ["/held", "/after"]
        assert len(rec.conns) == 1
        assert pool.stats()["open"] == 1


async def test_drain_waits_for_requests_queued_for_a_connection(
        start_gateway: GatewayStarter, path: PathSwitch, full_path_calls: list[str]) -> None:
    """A graceful stop while one request holds the only connection and another waits for
    it: both are answered, the second over the connection the first gave back."""
    async with run_recorder() as rec:
        gw, gate, held = await one_connection_held(start_gateway, rec)
        pool = gw.gateway.pool
        queued = asyncio.ensure_future(fetch(gw, "/drained"))
        await until(lambda: pool.stats()["waiting"] == 1)
        stopping = asyncio.ensure_future(gw.runtime.stop())
        await asyncio.sleep(0)  # the stop has begun: no new connections accepted
        gate.set()
        assert (await held).status == 200
        drained = await queued
        assert drained.status == 200 and drained.body == b"up:2:GET /drained\n"
        await stopping
        assert len(rec.conns) == 1
        lean_as_expected(path, full_path_calls, "/drained")


async def test_idle_connections_the_upstream_closes_leave_the_pool(
        start_gateway: GatewayStarter, path: PathSwitch) -> None:
    """Idle connections the upstream closes are taken out of the idle queue (the next
    request opens a new one), as are those idle expiry closes; the one in use stays."""
    async with run_recorder() as rec:
        gate = asyncio.Event()

        async def behave(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
            writer.write(fixed_response(req, len(conn.requests)))
            await writer.drain()
            if "/close-later" in req.target:
                async with asyncio.timeout(10):
                    await gate.wait()
                return False  # the upstream ends this idle connection
            return True

        rec.behaviour = behave
        gw = await start(start_gateway, rec.url)
        pool = gw.gateway.pool
        answers = await asyncio.gather(*(fetch(gw, f"/close-later/{i}") for i in range(3)),
                                       fetch(gw, "/stays"))
        assert [a.status for a in answers] == [200] * 4
        await until(lambda: pool.stats()["idle"] == 4)
        gate.set()
        await until(lambda: pool.stats()["idle"] == 1)
        assert pool.stats()["open"] == 1
        assert (await fetch(gw, "/reuses")).status == 200
        assert len(rec.conns) == 4  # the remaining idle connection served it


async def test_upstream_connections_do_not_wait_to_fill_a_segment(
        start_gateway: GatewayStarter, path: PathSwitch) -> None:
    """TCP_NODELAY on upstream connections (the event loop sets it on every TCP transport)."""
    async with run_recorder() as rec:
        gw = await start(start_gateway, rec.url)
        assert (await fetch(gw, "/one")).status == 200
        conns = list(gw.gateway.pool._all)
        assert len(conns) == 1 and conns[0].transport is not None
        sock = conns[0].transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
