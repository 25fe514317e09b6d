"""Guard: allowances, blocks and their end, unlock, failure rate, concurrency (memory, Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.tokens import Guard, TokenBackendUnavailable, open_guard
from gateway.tokens.guard import MemoryCounters
from tests.redis_server import RedisServer

GuardFactory = Callable[..., Guard]


@pytest.fixture
async def make(backend_url: str) -> AsyncIterator[GuardFactory]:
    made: list[Guard] = []

    def factory(**kw: object) -> Guard:
        args: dict[str, object] = {
            "max_failures": 3,
            "window": 10.0,
            "lockout": 1.0,
            "rate_limit": "1000/second",
            "max_concurrency": 4,
        }
        args.update(kw)
        g = open_guard(backend_url, **args)  # type: ignore[arg-type]
        made.append(g)
        return g

    yield factory
    for g in made:
        await g.close()


async def test_allowance_then_block_and_its_end(make: GuardFactory) -> None:
    g = make()  # 3 wrong tokens per 10 s, then a 1 s block
    for n in (1, 2, 3):
        got = await g.user_failed("u1")
        assert (got.allowed, got.started, got.failures) == (True, False, n)
    assert await g.user_locked("u1") == 0
    crossing = await g.user_failed("u1")
    assert (crossing.allowed, crossing.started) == (False, True)
    assert 0 < crossing.retry_after <= 1.0
    after = await g.user_failed("u1")
    assert (after.allowed, after.started) == (False, False)  # the block starts once
    assert 0 < await g.user_locked("u1") <= 1.0
    assert await g.user_locked("u2") == 0  # others unaffected
    await asyncio.sleep(1.3)
    assert await g.user_locked("u1") == 0
    # A fresh allowance after the block, although the 10 s window has not passed.
    assert (await g.user_failed("u1")).allowed


async def test_users_and_addresses_are_counted_apart(make: GuardFactory) -> None:
    g = make()
    for _ in range(4):
        await g.user_failed("victim")
    assert await g.user_locked("victim") > 0
    assert await g.address_locked("10.0.0.1") == 0
    for _ in range(4):
        await g.address_failed("10.0.0.5")
    assert await g.address_locked("10.0.0.5") > 0
    assert await g.address_locked("::ffff:10.0.0.5") > 0  # the same address, IPv4-mapped
    assert await g.address_locked("10.0.0.6") == 0
    assert await g.user_locked("10.0.0.5") == 0


async def test_failures_outside_window_do_not_add_up(make: GuardFactory) -> None:
    g = make(window=1.0, lockout=5.0)
    await g.address_failed("10.0.0.1")
    await g.address_failed("10.0.0.1")
    await asyncio.sleep(1.2)
    assert (await g.address_failed("10.0.0.1")).failures == 1
    assert await g.address_locked("10.0.0.1") == 0


async def test_unlock_lifts_a_user_or_an_address(make: GuardFactory) -> None:
    g = make(max_failures=1, lockout=60.0)
    for _ in range(2):
        await g.user_failed("u")
        await g.address_failed("10.0.0.1")
    assert await g.user_locked("u") > 50 and await g.address_locked("10.0.0.1") > 50
    assert await g.unlock("user", "u")
    assert await g.user_locked("u") == 0 and await g.address_locked("10.0.0.1") > 50
    assert await g.unlock("address", "::ffff:10.0.0.1")
    assert await g.address_locked("10.0.0.1") == 0
    with pytest.raises(ValueError, match="not an IP address"):
        await g.unlock("address", "example.com")
    with pytest.raises(ValueError):
        await g.unlock("everyone", "x")


async def test_failure_rate(make: GuardFactory) -> None:
    g = make(rate_limit="5/second")
    results = [await g.failure_rate() for _ in range(8)]
    assert results[:5] == [0.0] * 5
    assert all(0 < r <= 1.0 for r in results[5:])
    await asyncio.sleep(1.1)
    assert await g.failure_rate() == 0.0


async def test_concurrent_failures_take_exactly_the_allowance(make: GuardFactory) -> None:
    g = make(max_failures=5, lockout=30.0)
    got = await asyncio.gather(*(g.user_failed("u") for _ in range(100)))
    assert sum(a.allowed for a in got) == 5
    assert sum(a.started for a in got) == 1
    assert sorted(a.failures for a in got) == list(range(1, 101))


def test_memory_counters_are_bounded() -> None:
    counters = MemoryCounters(max_keys=100)

    async def run() -> None:
        for n in range(1000):
            await counters.hit(f"k{n}", 3, 60.0, 60.0)

    asyncio.run(run())
    assert len(counters) == 100


async def test_concurrency_slot(make: GuardFactory) -> None:
    g = make(max_concurrency=2)
    with g.slot() as a, g.slot() as b:
        with g.slot() as c:
            assert (a, b, c) == (True, True, False)
        assert g.active == 2
    assert g.active == 0
    with g.slot() as d:
        assert d


async def test_two_guards_on_one_redis_count_together(redis_server: RedisServer) -> None:
    kw: dict[str, object] = dict(
        max_failures=4, window=10.0, lockout=1.0, rate_limit="3/second", max_concurrency=4
    )
    one = open_guard(redis_server.url, **kw)  # type: ignore[arg-type]
    two = open_guard(redis_server.url, **kw)  # type: ignore[arg-type]
    try:
        for g in (one, two, one, two):
            assert (await g.user_failed("u1")).allowed
        assert (await one.user_failed("u1")).started
        assert await two.user_locked("u1") > 0
        await two.unlock("user", "u1")
        assert await one.user_locked("u1") == 0
        # The rate of wrong tokens is shared as well.
        got = [await one.failure_rate(), await two.failure_rate(), await one.failure_rate(),
               await two.failure_rate()]
        assert got[:3] == [0.0, 0.0, 0.0] and got[3] > 0
        # 100 concurrent wrong guesses split over both: exactly the allowance is admitted.
        attempts = await asyncio.gather(
            *((one, two)[n % 2].address_failed("10.9.9.9") for n in range(100)))
        assert sum(a.allowed for a in attempts) == 4
        assert sum(a.started for a in attempts) == 1
    finally:
        await one.close()
        await two.close()


async def test_redis_down_raises(redis_server: RedisServer) -> None:
    g = open_guard(
        redis_server.url,
        max_failures=3,
        window=10,
        lockout=1,
        rate_limit="9/second",
        max_concurrency=4,
    )
    try:
        await g.ping()
        redis_server.stop()
        for call in (
            g.failure_rate(),
            g.user_failed("u"),
            g.address_locked("1.1.1.1"),
            g.unlock("user", "u"),
            g.ping(),
        ):
            with pytest.raises(TokenBackendUnavailable):
                await call
    finally:
        await g.close()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        open_guard(
            "memory", max_failures=0, window=1, lockout=1, rate_limit="1/second", max_concurrency=1
        )
    with pytest.raises(ValueError):
        open_guard(
            "nope://", max_failures=1, window=1, lockout=1, rate_limit="1/second", max_concurrency=1
        )
    with pytest.raises(ValueError):
        open_guard(
            "memory", max_failures=1, window=1, lockout=1, rate_limit="lots", max_concurrency=1
        )
