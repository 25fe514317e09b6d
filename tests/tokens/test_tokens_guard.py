"""Guard: failure windows, lock-out and its end, global rate, concurrency — memory and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.tokens import Guard, TokenBackendUnavailable, open_guard
from tests.redis_server import RedisServer

GuardFactory = Callable[..., Guard]


@pytest.fixture(params=["memory", "redis"])
async def guard_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def make(guard_url: str) -> AsyncIterator[GuardFactory]:
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
        g = open_guard(guard_url, **args)  # type: ignore[arg-type]
        made.append(g)
        return g

    yield factory
    for g in made:
        await g.close()


async def test_lockout_after_max_failures_and_its_end(make: GuardFactory) -> None:
    g = make()
    assert await g.lockout_remaining("10.0.0.1") == 0
    assert await g.record_failure("10.0.0.1", "u1") == 0
    assert await g.record_failure("10.0.0.1", "u1") == 0
    assert await g.lockout_remaining("10.0.0.1", "u1") == 0
    assert await g.record_failure("10.0.0.1", "u1") == 1.0  # the third starts the lock-out
    assert 0 < await g.lockout_remaining("10.0.0.1") <= 1.0
    assert 0 < await g.lockout_remaining("10.0.0.9", "u1") <= 1.0  # the user, from elsewhere
    assert await g.lockout_remaining("10.0.0.9", "u2") == 0  # others unaffected
    await asyncio.sleep(1.3)
    assert await g.lockout_remaining("10.0.0.1", "u1") == 0
    # A fresh allowance after the lock-out, although the 10 s window has not passed.
    assert await g.record_failure("10.0.0.1", "u1") == 0


async def test_failures_are_counted_per_address_and_per_user(make: GuardFactory) -> None:
    g = make()
    # Three addresses, one user: the user is locked, the addresses are not.
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        await g.record_failure(ip, "victim")
    assert await g.lockout_remaining("10.0.0.1") == 0
    assert await g.lockout_remaining("10.0.0.4", "victim") > 0
    # One address, three users: the address is locked.
    for user in ("a", "b", "c"):
        await g.record_failure("10.0.0.5", user)
    assert await g.lockout_remaining("10.0.0.5") > 0
    assert await g.lockout_remaining("10.0.0.6", "a") == 0


async def test_failures_outside_window_do_not_add_up(make: GuardFactory) -> None:
    g = make(window=1.0, lockout=5.0)
    await g.record_failure("10.0.0.1")
    await g.record_failure("10.0.0.1")
    await asyncio.sleep(1.2)
    assert await g.record_failure("10.0.0.1") == 0
    assert await g.lockout_remaining("10.0.0.1") == 0


async def test_reset_unlocks(make: GuardFactory) -> None:
    g = make(max_failures=1, lockout=60.0)
    assert await g.record_failure("10.0.0.1", "u") == 60.0
    assert await g.lockout_remaining("10.0.0.1") > 50
    await g.reset("10.0.0.1", "u")
    assert await g.lockout_remaining("10.0.0.1", "u") == 0


async def test_global_rate(make: GuardFactory) -> None:
    g = make(rate_limit="5/second")
    results = [await g.admit() for _ in range(8)]
    assert results[:5] == [0.0] * 5
    assert all(r >= 1.0 for r in results[5:])
    await asyncio.sleep(1.1)
    assert await g.admit() == 0.0


async def test_concurrency_slot(make: GuardFactory) -> None:
    g = make(max_concurrency=2)
    with g.slot() as a, g.slot() as b:
        with g.slot() as c:
            assert (a, b, c) == (True, True, False)
        assert g.active == 2
    assert g.active == 0
    with g.slot() as d:
        assert d


async def test_two_guards_on_one_redis_lock_out_together(redis_server: RedisServer) -> None:
    kw: dict[str, object] = dict(
        max_failures=4, window=10.0, lockout=1.0, rate_limit="3/second", max_concurrency=4
    )
    one = open_guard(redis_server.url, **kw)  # type: ignore[arg-type]
    two = open_guard(redis_server.url, **kw)  # type: ignore[arg-type]
    try:
        await one.record_failure("10.0.0.1", "u1")
        await two.record_failure("10.0.0.1", "u1")
        await one.record_failure("10.0.0.1", "u1")
        assert await two.record_failure("10.0.0.1", "u1") > 0
        assert await one.lockout_remaining("10.0.0.1") > 0
        assert await two.lockout_remaining("10.0.0.1") > 0
        # The global rate is shared as well.
        got = [await one.admit(), await two.admit(), await one.admit(), await two.admit()]
        assert got[:3] == [0.0, 0.0, 0.0] and got[3] > 0
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
            g.admit(),
            g.lockout_remaining("10.0.0.1", "u"),
            g.record_failure("1.1.1.1"),
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
