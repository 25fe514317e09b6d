"""The CEC validation callback over real sockets: binding, expiry, revocation, allow-list,
lock-out, body limits, logging."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import aiohttp
import pytest

from tests.tokens.conftest import (
    TENANT,
    TEST_IP_HEADER,
    GatewayFactory,
    issue_token,
    post_validate,
    validate_body,
)

OK = {"retCode": 0, "message": "validate success"}
FAILED = {"retCode": 1, "message": "validate failed"}


async def test_valid_token_succeeds(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway()
    token = (await issue_token(http, gw))["token"]
    status, body, headers = await post_validate(http, gw, validate_body(token))
    assert (status, body) == (200, OK)
    assert headers["Cache-Control"] == "no-store"
    assert ("validate", "ok") in gw.metrics


@pytest.mark.parametrize(
    "change",
    [{"userId": "u2"}, {"userName": "Tim"}, {"tenantSpaceId": "999"}, {"Token": "A" * 43}],
)
async def test_each_wrong_field_gets_the_same_failure(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, change: dict[str, str]
) -> None:
    gw = await make_gateway()
    token = (await issue_token(http, gw))["token"]
    status, body, _ = await post_validate(http, gw, {**validate_body(token), **change})
    assert (status, body) == (200, FAILED)
    assert ("validate", "failed") in gw.metrics


@pytest.mark.parametrize(
    "payload",
    [
        {},
        [],
        "text",
        5,
        {"Token": None, "userId": "u1", "userName": "Tom", "tenantSpaceId": TENANT},
        {"userId": "u1", "userName": "Tom", "tenantSpaceId": TENANT},
    ],
)
async def test_missing_or_malformed_fields_fail(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, payload: object
) -> None:
    gw = await make_gateway()
    status, body, _ = await post_validate(http, gw, payload)
    assert (status, body) == (200, FAILED)


async def test_token_of_another_tenant_store_binding_is_refused(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # A token bound to a foreign tenant is refused even when the body names that tenant.
    gw = await make_gateway()
    issued = await gw.store.issue("u1", "Tom", "other-tenant")
    status, body, _ = await post_validate(
        http, gw, {**validate_body(issued.token), "tenantSpaceId": "other-tenant"}
    )
    assert (status, body) == (200, FAILED)


async def test_lower_case_token_key_tolerated(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway()
    token = (await issue_token(http, gw))["token"]
    body = validate_body(token)
    body["token"] = body.pop("Token")
    assert (await post_validate(http, gw, body))[1] == OK


async def test_expired_token_refused(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(ttl=0.3)
    token = (await issue_token(http, gw))["token"]
    assert (await post_validate(http, gw, validate_body(token)))[1] == OK
    await asyncio.sleep(0.45)
    assert (await post_validate(http, gw, validate_body(token)))[1] == FAILED


async def test_revoked_token_refused(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway()
    token = (await issue_token(http, gw))["token"]
    await gw.store.revoke(token)
    assert (await post_validate(http, gw, validate_body(token)))[1] == FAILED


async def test_allow_list(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(
        validate_allow_from=[ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    )
    token = (await issue_token(http, gw))["token"]
    # The real socket address (127.0.0.1) is not allowed: refused before the token is looked at.
    status, body, _ = await post_validate(http, gw, validate_body(token))
    assert status == 403 and body["retCode"] != 0
    assert ("validate", "forbidden") in gw.metrics
    for ip in ("10.1.2.3", "::ffff:10.1.2.3", "::1"):
        assert (await post_validate(http, gw, validate_body(token), ip=ip))[1] == OK
    for ip in ("11.0.0.1", "not-an-ip", "::2"):
        assert (await post_validate(http, gw, validate_body(token), ip=ip))[0] == 403


async def test_missing_client_ip_is_refused(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # An empty or unparsable gateway.client_ip (core bug) fails closed.
    gw = await make_gateway()
    status, _, _ = await post_validate(http, gw, validate_body("x" * 43), ip=" ")
    assert status == 403


async def test_post_only(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway()
    async with http.get(gw.validate_url) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"


async def test_wrong_tokens_past_the_allowance_429_but_the_right_token_validates(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway()  # max_failures=3, lockout=1 s
    token = (await issue_token(http, gw))["token"]
    for _ in range(3):
        status, body, _ = await post_validate(http, gw, validate_body("B" * 43))
        assert (status, body) == (200, FAILED)
    status, body, headers = await post_validate(http, gw, validate_body("B" * 43))
    assert status == 429 and body["retCode"] != 0
    assert headers["Retry-After"] == "1"
    assert ("validate", "limited") in gw.metrics
    assert gw.metrics.count(("validate", "lockout_started")) == 1
    # The user's own token: validated all the same (guessing gives no lever over the user).
    assert (await post_validate(http, gw, validate_body(token)))[1] == OK
    await asyncio.sleep(1.3)
    assert (await post_validate(http, gw, validate_body("B" * 43)))[:2] == (200, FAILED)


async def test_allow_listed_callers_are_never_locked_out(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(validate_allow_from=[ipaddress.ip_network("10.0.0.0/8")])
    token = (await issue_token(http, gw))["token"]
    # Wrong tokens for many users from one caller (the CEC relays anyone's): that caller's
    # address is not counted, so every user's right token still validates from it.
    for n in range(20):
        await post_validate(http, gw, validate_body("C" * 43, f"victim{n}"), ip="10.0.0.1")
    assert (await post_validate(http, gw, validate_body(token), ip="10.0.0.1"))[1] == OK
    # Wrong tokens naming one user from many callers: counted for the user, not the callers.
    for n in range(5):
        await post_validate(http, gw, validate_body("C" * 43), ip=f"10.0.0.{n + 1}")
    status, _, headers = await post_validate(http, gw, validate_body("C" * 43), ip="10.0.0.99")
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert (await post_validate(http, gw, validate_body(token), ip="10.0.0.99"))[1] == OK
    other = (await issue_token(http, gw, "u2", "Ann"))["token"]
    assert (await post_validate(http, gw, validate_body(other, "u2", "Ann"), ip="10.0.0.99"))[
        1
    ] == OK


async def test_oversized_body_413(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(max_body=256)
    big = validate_body("D" * 43, user_name="x" * 400)
    status, body, _ = await post_validate(http, gw, big)
    assert status == 413 and body["retCode"] != 0

    # Chunked, with no Content-Length to refuse early: cut off while reading.
    async def chunks() -> object:
        for _ in range(10):
            yield b" " * 100

    async with http.post(
        gw.validate_url, data=chunks(), headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 413


@pytest.mark.parametrize(
    ("content_type", "data", "status"),
    [
        ("text/plain", b'{"Token":"x"}', 415),
        ("application/x-www-form-urlencoded", b"Token=x", 415),
        ("application/json", b"{not json", 400),
        ("application/json", b"\xff\xfe", 400),
    ],
)
async def test_non_json_bodies(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    content_type: str,
    data: bytes,
    status: int,
) -> None:
    gw = await make_gateway()
    async with http.post(gw.validate_url, data=data, headers={"Content-Type": content_type}) as r:
        assert r.status == status
        assert (await r.json(content_type=None))["retCode"] != 0


async def test_json_with_charset_accepted(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway()
    token = (await issue_token(http, gw))["token"]
    import json

    async with http.post(
        gw.validate_url,
        data=json.dumps(validate_body(token)),
        headers={"Content-Type": "application/json;charset=UTF-8"},
    ) as resp:
        assert await resp.json() == OK


async def test_slow_body_cut_off(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(body_timeout=0.3)
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    try:
        writer.write(
            f"POST {gw.cfg.validate_path} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
        )
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        elapsed = loop.time() - started
        assert head.startswith(b"HTTP/1.1 408")
        assert 0.2 < elapsed < 1.5
        # The server drops the connection rather than waiting for the rest.
        rest = await asyncio.wait_for(reader.read(), 3)
        assert b"body too slow" in rest
    finally:
        writer.close()


async def test_failures_logged_without_token(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gateway()
    token = (await issue_token(http, gw))["token"]
    with caplog.at_level(logging.INFO, logger="gateway.tokens"):
        await post_validate(http, gw, validate_body(token, user_name="Wrong"), ip="127.0.0.1")
        await post_validate(http, gw, validate_body(token))
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert failures and "127.0.0.1" in failures[0].getMessage()
    assert "validate" in failures[0].getMessage()
    assert all(token not in r.getMessage() for r in caplog.records)


def test_header_is_test_only() -> None:
    # The endpoints module never reads the test header: identity of the caller is the core's job.
    import inspect

    from gateway.tokens import handlers

    assert TEST_IP_HEADER not in inspect.getsource(handlers)


async def test_routes_table(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(validate_path="/cb", issue_path="/tok")
    routes = gw.endpoints.routes()
    assert routes == {"/cb": gw.endpoints.validate, "/tok": gw.endpoints.issue}
