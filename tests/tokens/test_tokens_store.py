"""TokenStore: binding, expiry, revocation, hashing at rest, reuse — memory and real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import cast

import pytest
import redis.asyncio as aioredis

from gateway.tokens import (
    IssuedToken,
    MemoryTokenStore,
    RedisTokenStore,
    TokenBackendUnavailable,
    TokenStore,
    open_store,
)
from gateway.tokens.store import TokenStoreFull
from tests.redis_server import RedisServer

KEY = b"k" * 32


@pytest.fixture
async def store(backend_url: str) -> AsyncIterator[TokenStore]:
    s = open_store(backend_url, KEY, 60)
    yield s
    await s.close()


async def test_open_store_kinds(redis_server: RedisServer) -> None:
    mem = open_store("memory", KEY, 5)
    red = open_store(redis_server.url, KEY, 5)
    assert isinstance(mem, MemoryTokenStore)
    assert isinstance(red, RedisTokenStore)
    assert isinstance(mem, TokenStore) and isinstance(red, TokenStore)
    await red.ping()
    await red.close()
    with pytest.raises(ValueError):
        open_store("memcached://x", KEY, 5)


async def test_issue_then_check(store: TokenStore) -> None:
    before = time.time()
    issued = await store.issue("u1", "Tom", "t1")
    assert len(issued.token) >= 22  # 128 bits in base64url is 22 characters; ours has 43
    assert before + 59 < issued.expires_at <= time.time() + 60
    assert await store.check(issued.token, "u1", "Tom", "t1")


@pytest.mark.parametrize(
    ("user_id", "user_name", "tenant"),
    [
        ("u2", "Tom", "t1"),
        ("u1", "Tim", "t1"),
        ("u1", "Tom", "t2"),
        ("U1", "Tom", "t1"),
        ("u1", "Tom ", "t1"),
        ("", "", ""),
    ],
)
async def test_each_wrong_field_refused(
    store: TokenStore, user_id: str, user_name: str, tenant: str
) -> None:
    issued = await store.issue("u1", "Tom", "t1")
    assert not await store.check(issued.token, user_id, user_name, tenant)


async def test_unknown_and_malformed_tokens_refused(store: TokenStore) -> None:
    issued = await store.issue("u1", "Tom", "t1")
    flipped = issued.token[:-1] + ("A" if issued.token[-1] != "A" else "B")
    for bad in [flipped, "", "short", "x" * 5000, issued.token + " ", "ä" * 43]:
        assert not await store.check(bad, "u1", "Tom", "t1")
    assert await store.check(issued.token, "u1", "Tom", "t1")


async def test_tokens_are_unique(store: TokenStore) -> None:
    tokens = {(await store.issue("u1", "Tom", "t1")).token for _ in range(50)}
    assert len(tokens) == 50


async def test_expiry(backend_url: str) -> None:
    s = open_store(backend_url, KEY, 0.3)
    try:
        issued = await s.issue("u1", "Tom", "t1")
        assert await s.check(issued.token, "u1", "Tom", "t1")
        await asyncio.sleep(0.45)
        assert not await s.check(issued.token, "u1", "Tom", "t1")
    finally:
        await s.close()


async def test_revocation(store: TokenStore) -> None:
    a = await store.issue("u1", "Tom", "t1")
    b = await store.issue("u1", "Tom", "t1")
    assert await store.revoke(a.token) is True
    assert not await store.check(a.token, "u1", "Tom", "t1")
    assert await store.check(b.token, "u1", "Tom", "t1")  # only that one
    assert await store.revoke(a.token) is False
    assert await store.revoke("never-issued-token-xyz") is False


async def test_token_for_reuses_a_valid_token(store: TokenStore) -> None:
    first = await store.token_for("u1", "Tom", "t1")
    again = await store.token_for("u1", "Tom", "t1")
    other = await store.token_for("u2", "Ann", "t1")
    assert again.token == first.token
    assert other.token != first.token
    await store.revoke(first.token)
    fresh = await store.token_for("u1", "Tom", "t1")
    assert fresh.token != first.token
    assert await store.check(fresh.token, "u1", "Tom", "t1")


async def test_token_for_reuses_until_close_to_expiry(backend_url: str) -> None:
    s = open_store(backend_url, KEY, 1.0)  # renewed when less than 0.1 s is left
    try:
        first = await s.token_for("u1", "Tom", "t1")
        await asyncio.sleep(0.6)  # past half its life: still the same token
        assert (await s.token_for("u1", "Tom", "t1")).token == first.token
        await asyncio.sleep(first.expires_at - time.time())
        renewed = await s.token_for("u1", "Tom", "t1")
        assert renewed.token != first.token
        assert await s.check(renewed.token, "u1", "Tom", "t1")
    finally:
        await s.close()


async def test_token_for_keeps_one_token_per_user_id(backend_url: str) -> None:
    s = open_store(backend_url, KEY, 60)
    try:
        api = await s.issue("u1", "Tom", "t1")  # the issuing API's token is left alone
        first = await s.token_for("u1", "Tom", "t1")
        # A guest's page can send any name: each new name replaces the token (the old one
        # is revoked at once), it does not add one.
        names = [await s.token_for("u1", f"Name {n}", "t1") for n in range(50)]
        assert len({t.token for t in names}) == 50
        assert not await s.check(first.token, "u1", "Tom", "t1")
        assert not any([await s.check(t.token, "u1", f"Name {n}", "t1")
                        for n, t in enumerate(names[:-1])])
        assert await s.check(names[-1].token, "u1", "Name 49", "t1")
        assert await s.check(api.token, "u1", "Tom", "t1")
        assert await s._count() == 2  # type: ignore[attr-defined]
    finally:
        await s.close()


async def test_store_cap_refuses_and_counts(backend_url: str) -> None:
    full: list[int] = []
    s = open_store(backend_url, KEY, 0.5, max_tokens=3, on_full=lambda: full.append(1))
    try:
        made = [await s.issue(f"u{n}", "n", "t1") for n in range(3)]
        with pytest.raises(TokenStoreFull):
            await s.issue("u9", "n", "t1")
        with pytest.raises(TokenBackendUnavailable):  # the callers' fail-closed path
            await s.token_for("u9", "n", "t1")
        assert len(full) == 2 and s.refused == 2  # type: ignore[attr-defined]
        assert all([await s.check(t.token, f"u{n}", "n", "t1") for n, t in enumerate(made)])
        # Room again once tokens expire (or are revoked).
        await s.revoke(made[0].token)
        await s.issue("u9", "n", "t1")
        await asyncio.sleep(0.6)
        assert await s.issue("u10", "n", "t1")
    finally:
        await s.close()


async def test_token_for_respects_revocation_by_another_process(redis_server: RedisServer) -> None:
    one = open_store(redis_server.url, KEY, 60)
    two = open_store(redis_server.url, KEY, 60)
    try:
        first = await one.token_for("u1", "Tom", "t1")
        assert await two.revoke(first.token)
        assert (await one.token_for("u1", "Tom", "t1")).token != first.token
    finally:
        await one.close()
        await two.close()


async def test_redis_holds_no_replayable_token(redis_server: RedisServer) -> None:
    s = open_store(redis_server.url, KEY, 60)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        issued = await s.issue("u1", "Tom", "t1")
        keys = [str(k, "utf-8") if isinstance(k, bytes) else k for k in await raw.keys("*")]
        assert len(keys) == 2 and "gateway:tokens" in keys  # the entry, and the cap's index
        keys.remove("gateway:tokens")
        stored = await raw.get(keys[0])
        assert isinstance(stored, bytes)
        index = await raw.zrange("gateway:tokens", 0, -1)
        dump = keys[0].encode() + stored + b"".join(cast(list[bytes], index))
        assert issued.token.encode() not in dump
        assert b"u1" in dump  # the binding is there, readable
        ttl = await raw.pttl(keys[0])
        assert 0 < ttl <= 60_000
        # A store with another signing key cannot use the same entries.
        other = open_store(redis_server.url, b"z" * 32, 60)
        assert not await other.check(issued.token, "u1", "Tom", "t1")
        await other.close()
    finally:
        await raw.aclose()
        await s.close()


async def test_memory_store_holds_no_token() -> None:
    s = MemoryTokenStore(KEY, 60)
    issued = await s.issue("u1", "Tom", "t1")
    assert all(
        issued.token not in k and issued.token.encode() not in v for k, (v, _) in s._entries.items()
    )
    assert issued.token not in repr(s) and issued.token not in repr(issued)


async def test_redis_down_raises_backend_unavailable(redis_server: RedisServer) -> None:
    s = open_store(redis_server.url, KEY, 60)
    try:
        issued = await s.issue("u1", "Tom", "t1")
        redis_server.stop()
        with pytest.raises(TokenBackendUnavailable):
            await s.check(issued.token, "u1", "Tom", "t1")
        with pytest.raises(TokenBackendUnavailable):
            await s.issue("u1", "Tom", "t1")
        with pytest.raises(TokenBackendUnavailable):
            await s.revoke(issued.token)
        with pytest.raises(TokenBackendUnavailable):
            await s.ping()
    finally:
        await s.close()


def test_expires_at_iso() -> None:
    t = IssuedToken("x", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())
    assert t.expires_at_iso == "2026-01-02T03:04:05Z"
    assert "x" not in repr(t).replace("expires_at", "")


def test_bad_construction() -> None:
    with pytest.raises(ValueError):
        MemoryTokenStore(b"", 10)
    with pytest.raises(ValueError):
        MemoryTokenStore(KEY, 0)


def test_missing_redis_binary_is_a_clear_error() -> None:
    from tests.redis_server import RedisServerMissing

    with pytest.raises(RedisServerMissing, match="apt-get install redis-server"):
        RedisServer("/nonexistent/redis-server").start()
