"""The Redis counters' exact answers and the Redis credentials the guard connects with, on real
redis-servers (issue 19: mutation testing left the seconds-left arithmetic of RedisCounters, its
"missing or without expiry" case and the passing of token.redis to the guard unchecked).

Keys are put in known states with a plain client (no TTL, a long TTL, absent), so every answer
is exact or within a millisecond-wide bound, and nothing sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from gateway.config import TokenGuard, TokenRedis
from gateway.redisconn import RedisAuth
from gateway.tokens import TokenBackendUnavailable
from gateway.tokens.guard import (
    Counters,
    Guard,
    RedisCounters,
    guard_from_config,
    open_counters,
    open_guard,
    user_key,
)
from tests.redis_server import RedisServer, redis_or_fail, running_redis
from tests.tokens.conftest import make_cfg

PASSWORD = "guard-acl-pass-51c2"
# Only the ACL user `gw` may log in (the default user is off): a client without the
# configured username and password cannot count at all.
ACL = ["--user", "default", "off", "--user", "gw", "on", f">{PASSWORD}", "~*", "+@all"]
KEY = "gateway:guard:test"


@pytest.fixture
def plain_redis() -> Iterator[RedisServer]:
    with redis_or_fail() as server:
        yield server


@pytest.fixture
async def counters(plain_redis: RedisServer) -> AsyncIterator[Counters]:
    c = open_counters(plain_redis.url)
    assert isinstance(c, RedisCounters)
    yield c
    await c.close()


@pytest.fixture
async def raw(plain_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(plain_redis.url)
    yield r
    await r.aclose()


async def test_peek_of_an_absent_key_is_zero_and_no_time(counters: Counters) -> None:
    assert await counters.peek(KEY) == (0, 0.0)  # PTTL -2: nothing counted, nothing to wait


async def test_peek_of_a_key_without_expiry_counts_as_absent(
        counters: Counters, raw: aioredis.Redis) -> None:
    await raw.set(KEY, 5)  # PTTL -1: never written so by the guard; treated as expired
    assert await counters.peek(KEY) == (0, 0.0)


async def test_peek_reports_count_and_seconds_left_in_milliseconds(
        counters: Counters, raw: aioredis.Redis) -> None:
    await raw.set(KEY, 7, px=1_000_000)
    count, left = await counters.peek(KEY)
    assert count == 7
    assert 999.5 < left <= 1000.0  # PTTL / 1000, read a moment after it was set


async def test_hit_reports_the_window_then_the_block(counters: Counters) -> None:
    # The script sets and reads the expiry in one step, but a Redis that reads PTTL from its
    # live clock even inside a script (as 7.0 does) may report a millisecond less than it set.
    count, left = await counters.hit(KEY, 2, 1000.0, 3000.0)
    assert count == 1 and 999.5 < left <= 1000.0
    count, left = await counters.hit(KEY, 2, 1000.0, 3000.0)
    assert count == 2 and 999.5 < left <= 1000.0
    count, left = await counters.hit(KEY, 2, 1000.0, 3000.0)
    assert count == 3 and 2999.5 < left <= 3000.0  # crossing: the block
    count, left = await counters.peek(KEY)
    assert count == 3 and 2999.5 < left <= 3000.0


async def test_hit_gives_a_key_without_expiry_the_window(
        counters: Counters, raw: aioredis.Redis) -> None:
    await raw.set(KEY, 4)  # left without a TTL (e.g. by an operator): never counts forever
    count, left = await counters.hit(KEY, 10, 60.0, 600.0)
    assert count == 5 and 59.5 < left <= 60.0
    assert 59_500 < await raw.pttl(KEY) <= 60_000


@pytest.fixture
def acl_redis() -> Iterator[RedisServer]:
    with running_redis(extra=ACL) as server:
        yield server


@pytest.fixture
async def acl_raw(acl_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(acl_redis.url, username="gw", password=PASSWORD)
    yield r
    await r.aclose()


async def stored(r: aioredis.Redis, key: str) -> int:
    """The count under ``key`` as that Redis holds it; -1 when absent."""
    value = await r.get(key)
    return -1 if value is None else int(value)


AUTH = RedisAuth(username="gw", password=PASSWORD)


async def test_open_counters_logs_in_with_the_auth(
        acl_redis: RedisServer, acl_raw: aioredis.Redis) -> None:
    c = open_counters(acl_redis.url, AUTH)
    try:
        count, left = await c.hit(KEY, 3, 100.0, 100.0)
        assert count == 1 and 99.5 < left <= 100.0
        assert await stored(acl_raw, KEY) == 1  # counted in that Redis
    finally:
        await c.close()
    anonymous = open_counters(acl_redis.url)  # what a dropped auth would do
    try:
        with pytest.raises(TokenBackendUnavailable):
            await anonymous.hit(KEY, 3, 100.0, 100.0)
    finally:
        await anonymous.close()


async def locked_out_after_three_failures(g: Guard, raw: aioredis.Redis, user: str, *,
                                          lockout: float) -> None:
    """Three failures past a limit of two: the user is locked for ``lockout`` seconds, and
    the counter in Redis says 3."""
    for _ in range(3):
        await g.user_failed(user)
    assert lockout - 1.0 < await g.user_locked(user) <= lockout
    assert await stored(raw, user_key(user)) == 3


async def test_open_guard_counts_in_the_password_protected_redis(
        acl_redis: RedisServer, acl_raw: aioredis.Redis) -> None:
    g = open_guard(acl_redis.url, max_failures=2, window=100.0, lockout=100.0,
                   rate_limit="1000/second", max_concurrency=4, auth=AUTH)
    try:
        await locked_out_after_three_failures(g, acl_raw, "u1", lockout=100.0)
    finally:
        await g.close()


async def test_guard_from_config_uses_token_redis(
        acl_redis: RedisServer, acl_raw: aioredis.Redis) -> None:
    cfg = make_cfg(store=acl_redis.url,
                   redis=TokenRedis(username="gw", password=SecretStr(PASSWORD)),
                   guard=TokenGuard(max_failures=2, window=100.0, lockout=200.0))
    g = guard_from_config(cfg)
    try:
        await g.ping()
        await locked_out_after_three_failures(g, acl_raw, "u2", lockout=200.0)
    finally:
        await g.close()
