"""Two gateway instances on one real Redis behave as one; Redis down fails closed."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from tests.redis_server import RedisServer
from tests.tokens.conftest import API_KEY, GatewayFactory, issue_token, post_validate, validate_body

FAILED = {"retCode": 1, "message": "validate failed"}
OK = {"retCode": 0, "message": "validate success"}


async def test_issue_on_one_validate_on_other(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    one = await make_gateway(store=redis_server.url)
    two = await make_gateway(store=redis_server.url)
    assert one.server.port != two.server.port
    token = (await issue_token(http, one))["token"]
    assert (await post_validate(http, two, validate_body(token)))[1] == OK
    # Revoked on the second, refused by the first.
    async with http.delete(
        two.issue_url, json={"token": token}, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as r:
        assert r.status == 204
    assert (await post_validate(http, one, validate_body(token)))[1]["retCode"] == 1


async def test_failures_on_both_add_up_but_never_refuse_the_right_token(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    one = await make_gateway(store=redis_server.url)  # max_failures=3, lockout=1 s
    two = await make_gateway(store=redis_server.url)
    token = (await issue_token(http, one))["token"]
    for gw in (one, two, one):
        assert (await post_validate(http, gw, validate_body("E" * 43)))[0] == 200
    # Neither instance alone saw three wrong tokens; together they used the allowance: the
    # next wrong token on either is answered 429, the right one still validates on both.
    for gw in (two, one):
        status, _, headers = await post_validate(http, gw, validate_body("E" * 43))
        assert status == 429 and headers["Retry-After"] == "1"
        assert (await post_validate(http, gw, validate_body(token)))[1] == OK
    await asyncio.sleep(1.3)
    assert (await post_validate(http, two, validate_body("E" * 43)))[:2] == (200, FAILED)


async def test_redis_down_fails_closed(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway(store=redis_server.url)
    token = (await issue_token(http, gw))["token"]
    assert (await post_validate(http, gw, validate_body(token)))[1] == OK
    redis_server.stop()
    with caplog.at_level(logging.ERROR, logger="gateway.tokens"):
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, body, headers = await post_validate(http, gw, validate_body(token))
        assert loop.time() - started < 5  # fails fast, no hanging on a dead Redis
    assert status == 503
    assert body["retCode"] != 0
    assert "Retry-After" in headers
    assert ("validate", "unavailable") in gw.metrics
    assert any("unavailable" in r.getMessage() for r in caplog.records)
    assert all(token not in r.getMessage() for r in caplog.records)
    # Issuing fails closed too.
    async with http.post(
        gw.issue_url,
        json={"userId": "u1", "userName": "Tom"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as r:
        assert r.status == 503


async def test_recovers_when_redis_returns(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    gw = await make_gateway(store=redis_server.url)
    port = redis_server.port
    redis_server.stop()
    assert (await post_validate(http, gw, validate_body("F" * 43)))[0] == 503
    # Same port again (the store's URL is fixed), fresh and empty.
    restarted = RedisServer()
    restarted.start(port=port)
    try:
        token = (await issue_token(http, gw))["token"]
        assert (await post_validate(http, gw, validate_body(token)))[1] == OK
    finally:
        restarted.stop()
