"""Memory given back after a crowd: counted from real client connections to a real gateway;
malloc_trim degrades to nothing where the C library lacks it."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Callable

import pytest

from gateway.app import RequestIds
from gateway.memory import (
    FUTURE_ITER_FREE_LIST,
    UVLOOP_FREE_LIST,
    CrowdRelease,
    FreeLists,
    Trim,
    _libc_malloc_trim,
    tune_collector,
)
from gateway.metrics import Metrics
from tests.support.gateway import ROUTES, GatewayStarter, build_config
from tests.support.process import wait_for
from tests.support.rawhttp import read_response_head_and_body
from tests.support.upstreams import Echo


class CountingTrim(Trim):
    def __init__(self) -> None:
        super().__init__(find=lambda: None)
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return False


def test_requests_in_flight_do_not_trigger_young_collections() -> None:
    """Tens of thousands of objects alive at once (what a crowd of 5,000 connections and
    their requests in flight hold) are allocated without a collection of the youngest
    generation once the collector is tuned."""
    before = gc.get_threshold()
    try:
        tune_collector()
        assert gc.get_threshold()[1:] == before[1:]
        gc.collect()
        passes = gc.get_stats()[0]["collections"]
        held = [{"request": i} for i in range(40_000)]
        assert gc.get_stats()[0]["collections"] == passes
        assert len(held) == 40_000
    finally:
        gc.set_threshold(*before)


def test_trim_without_malloc_trim_does_nothing() -> None:
    trim = Trim(find=lambda: None)
    assert not trim.available
    assert trim() is False


def test_malloc_trim_is_looked_up_only_on_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _libc_malloc_trim() is None


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
def test_trim_calls_glibc() -> None:
    trim = Trim()
    assert trim.available
    trim()  # returns whether pages went back; either answer is fine, it must not raise


async def _open(port: int, n: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(n):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
    return writers


async def _close(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    for writer in writers:
        await writer.wait_closed()


async def test_memory_is_given_back_once_a_crowd_of_connections_closes(
        start_gateway: GatewayStarter, echo: Echo) -> None:
    running = await start_gateway(build_config(ROUTES, echo))
    server = running.listener.server
    trim = CountingTrim()
    crowd = server.crowd = CrowdRelease(crowd=6, follow_ups=(0.0, 0.2), every=0.05, trim=trim)
    port = running.listener.address[1]

    few = await _open(port, 5)
    await wait_for(lambda: crowd.open == 5)
    # Fewer than a crowd: nothing is even scheduled.
    assert crowd._handle is None
    await _close(few)
    await wait_for(lambda: crowd.open == 0)
    assert crowd.releases == 0

    many = await _open(port, 8)
    await wait_for(lambda: crowd.open == 8)
    assert crowd.peak == 8
    assert crowd._handle is not None  # watching; while they stay, no release
    await _close(many[:1])
    await wait_for(lambda: crowd.open == 7)
    await _close(many[1:])
    await wait_for(lambda: crowd.releases >= 1)
    assert crowd.open == 0
    assert trim.calls >= 1
    # And once more when the follow-up comes (the pool's idle connections by then expired).
    await wait_for(lambda: crowd.releases == 2)
    await wait_for(lambda: crowd._handle is None)
    assert trim.calls == 2


async def test_idle_upstream_connections_beyond_the_clients_left_close_with_the_crowd(
        start_gateway: GatewayStarter, echo: Echo) -> None:
    """A crowd of 8 clients left 8 idle upstream connections; once 7 clients went, the
    pool keeps 1 (as many as the clients still connected can use at once)."""
    running = await start_gateway(build_config(ROUTES, echo))
    server = running.listener.server
    pool = running.gateway.pool
    crowd = server.crowd = CrowdRelease(crowd=6, follow_ups=(0.0, 0.1, 0.2), every=0.05,
                                        trim=CountingTrim(), shed=server.shed_idle)
    port = running.listener.address[1]
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
    for _, writer in clients:
        writer.write(b"GET /app/do/slow?delay=0.3 HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    for reader, _ in clients:
        head, _ = await read_response_head_and_body(reader)
        assert head.startswith(b"HTTP/1.1 200 "), head
    await wait_for(lambda: pool.stats()["idle"] == 8)
    await _close([writer for _, writer in clients[1:]])
    await wait_for(lambda: crowd.releases >= 1)
    await wait_for(lambda: pool.stats() == {"open": 1, "idle": 1, "waiting": 0, "opened": 8})
    # The one left is the most recently used, and serves the remaining client.
    reader, writer = clients[0]
    writer.write(b"GET /app/again HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    head, _ = await read_response_head_and_body(reader)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert pool.stats()["opened"] == 8
    await _close([writer])


def test_a_crowd_that_stays_is_left_alone() -> None:
    calls: list[int] = []

    async def scenario() -> None:
        crowd = CrowdRelease(crowd=4, follow_ups=(0.0,), every=60.0)
        crowd.release = lambda: calls.append(crowd.open)  # type: ignore[method-assign]
        for _ in range(6):
            crowd.opened()
        crowd.closed()  # 5 of 6 stay
        crowd._check()
        assert calls == []
        assert crowd._handle is not None  # looks again later
        for _ in range(4):
            crowd.closed()  # 1 left: the crowd went
        crowd._check()
        assert calls == [1]
        assert crowd.peak == 1
        crowd.close()

    asyncio.run(scenario())


def test_idle_connections_are_shed_a_second_after_the_crowd_went_unless_it_came_back(
        ) -> None:
    shed: list[int] = []

    def watching() -> CrowdRelease:
        """A crowd of 4 whose follow-ups come at each ``_check``, shedding into ``shed``."""
        crowd = CrowdRelease(crowd=4, follow_ups=(0.0, 1.0, 2.0), every=60.0,
                             trim=CountingTrim(), shed=shed.append)
        crowd.release = lambda: None  # type: ignore[method-assign]
        return crowd

    async def scenario() -> None:
        crowd = watching()
        for _ in range(6):
            crowd.opened()
        for _ in range(5):
            crowd.closed()
        crowd._check()  # the crowd went: memory back at once, nothing shed yet
        assert shed == []
        crowd._check()  # a second later, and no new crowd: shed down to the 1 left
        assert shed == [1]
        crowd._check()
        assert shed == [1]
        crowd.close()

        # A crowd that comes back within that second keeps the pool's connections.
        again = watching()
        for _ in range(6):
            again.opened()
        for _ in range(6):
            again.closed()
        again._check()
        for _ in range(5):
            again.opened()
        again._check()  # watching the new crowd, which is still here
        assert shed == [1]
        again.close()

    asyncio.run(scenario())


def test_a_new_crowd_during_the_follow_ups_is_watched_at_once() -> None:
    calls: list[int] = []

    async def scenario() -> None:
        crowd = CrowdRelease(crowd=4, follow_ups=(0.0, 600.0), every=30.0)
        crowd.release = lambda: calls.append(crowd.open)  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        for _ in range(5):
            crowd.opened()
        for _ in range(5):
            crowd.closed()
        crowd._check()
        assert calls == [0]
        assert crowd._handle is not None and crowd._handle.when() > loop.time() + 500
        for _ in range(4):
            crowd.opened()
        # The next look is the usual interval away, not the long follow-up.
        assert crowd._handle is not None and crowd._handle.when() < loop.time() + 31
        crowd.close()

    asyncio.run(scenario())


def _swap_free_lists(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """A crowd's future iterators, callback and timer handles parked in their free lists
    are drained by a swap, and the plugs made before the crowd come back out of the lists
    instead of the crowd's objects."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        lists = FreeLists(loop)
        plugs = [{id(x) for x in plug}
                 for plug in (lists._iters, lists._handles, lists._timers)]
        # The crowd: more of each than the free lists keep, then let go of them all.
        future = loop.create_future()
        iters = [future.__await__() for _ in range(2 * FUTURE_ITER_FREE_LIST)]
        handles = [loop.call_soon(lambda: None) for _ in range(2 * UVLOOP_FREE_LIST)]
        timers = [loop.call_later(3600, lambda: None) for _ in range(2 * UVLOOP_FREE_LIST)]
        for handle in handles + timers:
            handle.cancel()
        crowd = [{id(x) for x in objects} for objects in (iters, handles, timers)]
        del iters, handles, timers
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the loop let go of the handles, the timers closed
        lists.begin()
        drained = [{id(x) for x in objects} for objects in
                   (lists._drained_iters, lists._drained_handles, lists._drained_timers)]
        await asyncio.sleep(0)
        lists.plug()
        await asyncio.sleep(0)
        lists.finish()
        assert lists.swaps == 1
        back = [{id(x) for x in plug} for plug in (lists._iters, lists._handles, lists._timers)]
        for kind in range(3 if lists.uvloop else 1):
            # What the free list held was the crowd's, and the swap took it out ...
            assert len(drained[kind] & crowd[kind]) >= UVLOOP_FREE_LIST * 3 // 4
            # ... and what comes back out is the plug, not the crowd's objects (a plug
            # object or two can be lost to a handle freed by the loop between the passes).
            assert len(back[kind] & plugs[kind]) >= len(plugs[kind]) - 5
        future.cancel()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


def test_a_crowds_objects_leave_the_free_lists_on_asyncio() -> None:
    _swap_free_lists(asyncio.new_event_loop)


def test_a_crowds_objects_leave_the_free_lists_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    _swap_free_lists(uvloop.new_event_loop)


async def test_a_release_after_a_crowd_swaps_the_free_lists(
        start_gateway: GatewayStarter, echo: Echo) -> None:
    running = await start_gateway(build_config(ROUTES, echo))
    server = running.listener.server
    crowd = server.crowd = CrowdRelease(crowd=6, follow_ups=(0.0,), every=0.05,
                                        trim=CountingTrim(), remake=server.remake_counters)
    metrics = running.gateway.metrics
    metrics.signatures = 1000
    signatures = metrics.signatures
    port = running.listener.address[1]
    first = await _open(port, 1)
    await wait_for(lambda: crowd.free_lists is not None)  # made before the crowd
    assert crowd.free_lists is not None
    many = await _open(port, 8)
    await _close(first + many)
    await wait_for(lambda: crowd.releases == 1)
    assert crowd.free_lists.swaps == 1
    # The counters were made anew, equal.
    assert metrics.signatures == signatures and metrics.signatures is not signatures


def _own_series(scrape: bytes) -> list[bytes]:
    # The process's own series (CPU seconds, memory, collector counts) move between scrapes.
    return [line for line in scrape.splitlines() if line.startswith(b"gateway_")]


def test_counters_are_made_anew_with_the_same_values() -> None:
    """What a crowd's last requests left as counter objects is replaced by equal new ones:
    the scrape reads the same."""
    metrics = Metrics()
    for _ in range(300):
        metrics.observe("app", "GET", 200, 0.002, None)
    metrics.signatures = 1000
    counts = dict(metrics._counts)
    buckets, total = (list(x) for x in metrics._hist["app"])
    scrape = _own_series(metrics.render())
    metrics.remake()
    assert _own_series(metrics.render()) == scrape
    for key, n in counts.items():
        assert metrics._counts[key] == n and metrics._counts[key] is not n
    after, after_total = metrics._hist["app"]
    assert after == buckets and after_total == total
    assert any(a is not b for a, b in zip(after, buckets, strict=True) if b > 256)
    assert after_total[0] is not total[0]
    ids = RequestIds()
    for _ in range(300):
        ids.next()
    n = ids._n
    ids.remake()
    assert ids._n == n and ids._n is not n
    assert ids.next().endswith(f"{301:010x}")
