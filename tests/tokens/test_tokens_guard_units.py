"""The guard's arithmetic on a clock the test moves (no sleeps): windows, blocks, keys,
bounds and the per-user allowance as the callback uses it (issue 19: mutation testing found
the window and the per-user path unchecked by fast tests)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from pydantic import SecretStr

from gateway.config import TokenConfig, TokenGuard
from gateway.tokens.guard import (
    Guard,
    MemoryCounters,
    _ms,
    address_key,
    guard_from_config,
    open_counters,
    open_guard,
    user_key,
)
from gateway.tokens.store import TokenBackendUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard(clock: Clock, **kw: object) -> Guard:
    args: dict[str, object] = {"max_failures": 3, "window": 10.0, "lockout": 60.0,
                               "rate_limit": "5/second", "max_concurrency": 2}
    args.update(kw)
    return Guard(MemoryCounters(clock=clock), **args)  # type: ignore[arg-type]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _fail_n(g: Guard, user: str, n: int) -> list[tuple[bool, bool, int]]:
    out = []
    for _ in range(n):
        a = await g.user_failed(user)
        out.append((a.allowed, a.started, a.failures))
    return out


def test_units_spaced_out_guesses_inside_the_window_lock() -> None:
    clock = Clock()
    g = guard(clock)

    async def go() -> None:
        for n in (1, 2, 3):
            a = await g.user_failed("u")
            assert (a.allowed, a.started, a.failures) == (True, False, n)
            assert a.retry_after == pytest.approx(10.0 - 3.0 * (n - 1))
            clock.now += 3.0  # spaced out, but all within the 10 s window
        a = await g.user_failed("u")
        assert (a.allowed, a.started, a.failures) == (False, True, 4)
        assert a.retry_after == pytest.approx(60.0)
        assert await g.user_locked("u") == pytest.approx(60.0)
        clock.now += 59.0
        a = await g.user_failed("u")
        assert (a.allowed, a.started, a.failures) == (False, False, 5)
        assert a.retry_after == pytest.approx(1.0)
        assert await g.user_locked("u") == pytest.approx(1.0)
        clock.now += 1.0  # the block ends exactly now
        assert await g.user_locked("u") == 0.0
        a = await g.user_failed("u")
        assert (a.allowed, a.started, a.failures) == (True, False, 1)

    run(go())


def test_units_the_window_ends_exactly_at_its_length() -> None:
    clock = Clock()
    g = guard(clock)

    async def go() -> None:
        await _fail_n(g, "u", 3)
        clock.now += 9.999
        assert (await g.user_failed("u")).started  # still the same window
        h = guard(clock)
        await _fail_n(h, "v", 3)
        clock.now += 10.0
        assert (await h.user_failed("v")).failures == 1  # a fresh window

    run(go())


def test_units_users_and_addresses_have_their_own_counters() -> None:
    clock = Clock()
    g = guard(clock, max_failures=1)

    async def go() -> None:
        assert (await g.user_failed("a")).allowed
        assert not (await g.user_failed("a")).allowed
        assert (await g.user_failed("b")).allowed
        assert await g.user_locked("b") == 0.0
        assert await g.address_locked("10.0.0.1") == 0.0
        assert (await g.address_failed("10.0.0.1")).allowed
        assert (await g.address_failed(" ::ffff:10.0.0.1 ")).started
        assert await g.address_locked("10.0.0.1") == pytest.approx(60.0)
        assert await g.address_locked("::ffff:10.0.0.1") == pytest.approx(60.0)
        assert await g.address_locked("10.0.0.2") == 0.0
        assert await g.user_locked("10.0.0.1") == 0.0
        # Anything that is not an address shares one bucket rather than failing.
        assert (await g.address_failed("not-an-ip")).allowed
        assert (await g.address_failed("also-not")).started
        assert await g.address_locked("whatever") == pytest.approx(60.0)

    run(go())


def test_units_the_lock_is_judged_by_the_allowance() -> None:
    clock = Clock()
    g = guard(clock, max_failures=2)

    async def go() -> None:
        await _fail_n(g, "u", 2)
        assert await g.user_locked("u") == 0.0  # exactly the allowance: not locked
        await _fail_n(g, "u", 1)
        assert await g.user_locked("u") == pytest.approx(60.0)
        await g.address_failed("10.0.0.9")
        await g.address_failed("10.0.0.9")
        assert await g.address_locked("10.0.0.9") == 0.0
        await g.address_failed("10.0.0.9")
        assert await g.address_locked("10.0.0.9") == pytest.approx(60.0)

    run(go())


def test_units_unlock() -> None:
    clock = Clock()
    g = guard(clock, max_failures=1)

    async def go() -> None:
        await _fail_n(g, "u", 2)
        await g.address_failed("10.0.0.1")
        await g.address_failed("10.0.0.1")
        assert await g.unlock("address", " ::ffff:10.0.0.1")
        assert await g.address_locked("10.0.0.1") == 0.0
        assert await g.user_locked("u") > 0
        assert await g.unlock("user", "u")
        assert await g.user_locked("u") == 0.0
        with pytest.raises(ValueError, match=r"'example\.com' is not an IP address"):
            await g.unlock("address", "example.com")
        with pytest.raises(ValueError, match="unlock a 'user' or an 'address'"):
            await g.unlock("users", "u")

    run(go())


def test_units_failure_rate() -> None:
    clock = Clock()
    g = guard(clock, rate_limit="3/minute")

    async def go() -> None:
        assert [await g.failure_rate() for _ in range(3)] == [0.0, 0.0, 0.0]
        assert await g.failure_rate() == pytest.approx(60.0)
        clock.now += 59.9999
        assert await g.failure_rate() == pytest.approx(0.001)  # never a zero wait
        clock.now += 0.0001
        assert await g.failure_rate() == 0.0

    run(go())


def test_units_window_and_lockout_floors() -> None:
    g = guard(Clock(), window=0, lockout=-5)
    assert g.window == 0.001 and g.lockout == 0.001
    assert repr(guard(Clock(), window=2.5)) == (
        "Guard(max_failures=3, window=2.5s, lockout=60s, rate=5/1s, max_concurrency=2)")


@pytest.mark.parametrize(("kw", "message"), [
    ({"max_failures": 0}, "max_failures must be at least 1"),
    ({"max_concurrency": 0}, "max_concurrency must be at least 1"),
])
def test_units_bad_arguments(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        guard(Clock(), **kw)
    guard(Clock(), max_failures=1, max_concurrency=1)  # the smallest accepted


def test_units_concurrency_slots() -> None:
    g = guard(Clock(), max_concurrency=2)
    assert g.active == 0
    with g.slot() as a:
        assert a and g.active == 1
        with g.slot() as b, g.slot() as c:
            assert (b, c) == (True, False)
            assert g.active == 2
        assert g.active == 1
    assert g.active == 0
    with pytest.raises(RuntimeError), g.slot():
        raise RuntimeError
    assert g.active == 0


def test_units_keys() -> None:
    digest = hashlib.sha256("üser".encode()).hexdigest()[:32]
    assert user_key("üser") == "gateway-guard:user:" + digest
    assert user_key("a") != user_key("b")
    assert address_key(" 10.0.0.1 ") == "gateway-guard:addr:10.0.0.1"
    assert address_key("::ffff:10.0.0.1") == "gateway-guard:addr:10.0.0.1"
    assert address_key("2001:DB8:0::1") == "gateway-guard:addr:2001:db8::1"
    with pytest.raises(ValueError):
        address_key("example.com")


@pytest.mark.parametrize(("seconds", "ms"), [(0, 1), (0.0001, 1), (0.001, 1), (0.0011, 2),
                                             (1, 1000), (2.5, 2500)])
def test_units_milliseconds_round_up(seconds: float, ms: int) -> None:
    assert _ms(seconds) == ms


def test_units_memory_counters_drop_the_oldest() -> None:
    clock = Clock()
    counters = MemoryCounters(max_keys=2, clock=clock)

    async def go() -> None:
        assert await counters.hit("a", 5, 10, 10) == (1, 10.0)
        await counters.hit("b", 5, 10, 10)
        await counters.hit("a", 5, 10, 10)  # a is counted again, not renewed
        await counters.hit("c", 5, 10, 10)
        assert len(counters) == 2
        assert await counters.peek("a") == (0, 0.0)  # the oldest counter went first
        assert await counters.peek("b") == (1, 10.0)
        assert await counters.peek("c") == (1, 10.0)
        clock.now += 10
        assert await counters.peek("b") == (0, 0.0)
        await counters.hit("d", 5, 10, 10)  # b (expired) is renewed only when hit
        await counters.clear("c")
        assert await counters.peek("c") == (0, 0.0)
        await counters.ping()
        await counters.close()
        assert len(counters) == 0

    run(go())


def test_units_a_renewed_counter_moves_to_the_back() -> None:
    clock = Clock()
    counters = MemoryCounters(max_keys=2, clock=clock)

    async def go() -> None:
        await counters.hit("a", 5, 1, 1)
        await counters.hit("b", 5, 10, 10)
        clock.now += 1
        await counters.hit("a", 5, 10, 10)  # expired: a new window, now the newest
        await counters.hit("c", 5, 10, 10)
        assert await counters.peek("a") == (1, 10.0)
        assert await counters.peek("b") == (0, 0.0)

    run(go())


def test_units_open_guard_on_memory() -> None:
    assert isinstance(open_counters("memory"), MemoryCounters)
    g = open_guard("memory", max_failures=2, window=3, lockout=4, rate_limit="7/hour",
                   max_concurrency=5)
    assert (g.max_failures, g.window, g.lockout, g.max_concurrency) == (2, 3, 4, 5)
    assert repr(g) == ("Guard(max_failures=2, window=3s, lockout=4s, rate=7/3600s, "
                       "max_concurrency=5)")
    run(g.ping())
    run(g.close())


def test_units_guard_from_config_takes_every_setting() -> None:
    cfg = TokenConfig(signing_key=SecretStr("s" * 32), api_key=SecretStr("k" * 24),
                      store="memory", guard=TokenGuard(max_failures=4, window=7.0, lockout=9.0),
                      rate_limit="11/minute", max_concurrency=13)
    g = guard_from_config(cfg)
    assert repr(g) == ("Guard(max_failures=4, window=7s, lockout=9s, rate=11/60s, "
                       "max_concurrency=13)")
    run(g.close())


@pytest.mark.parametrize(("kw", "message"), [
    ({"max_failures": 0}, r"^max_failures must be at least 1$"),
    ({"max_concurrency": 0}, r"^max_concurrency must be at least 1$"),
])
def test_units_bad_argument_messages(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        guard(Clock(), **kw)


def test_units_unlock_messages_and_unknown_names() -> None:
    g = guard(Clock())

    async def go() -> None:
        with pytest.raises(ValueError, match=r"^unlock a 'user' or an 'address'$"):
            await g.unlock("users", "u")
        # Nothing counted yet: unlocking is still an answer, not an error.
        assert await g.unlock("user", "never-failed")
        assert await g.unlock("address", "10.0.0.77")

    run(go())


def test_units_redis_counters_name_no_url_and_fail_closed() -> None:
    # Port 1 on loopback: refused at once, no server needed. The URL carries a password.
    counters = open_counters("redis://:hunter2@127.0.0.1:1/0")
    assert repr(counters) == "RedisCounters()"

    async def go() -> None:
        for call in (counters.hit("k", 1, 1.0, 1.0), counters.peek("k"), counters.clear("k"),
                     counters.ping()):
            with pytest.raises(TokenBackendUnavailable, match=r"^guard: \w*Error\b") as info:
                await call
            assert "hunter2" not in str(info.value) and "None" not in str(info.value)
        await counters.close()

    run(go())
