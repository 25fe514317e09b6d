"""POST/DELETE of the issuing endpoint: API key, issuing, revocation, disabled without a key."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import aiohttp
import pytest

from tests.tokens.conftest import (
    API_KEY,
    TENANT,
    GatewayFactory,
    issue_token,
    post_validate,
    validate_body,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def test_issue_answers_token_and_expiry(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(ttl=600)
    async with http.post(gw.issue_url, json={"userId": "u1", "userName": "Tom"}, headers=AUTH) as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-store"
        data = await r.json()
    assert set(data) == {"token", "expiresAt"}
    assert data["expiresAt"].endswith("Z")
    expires = datetime.fromisoformat(data["expiresAt"].replace("Z", "+00:00")).timestamp()
    assert abs(expires - (time.time() + 600)) < 5
    # Bound to the configured tenant.
    assert await gw.store.check(data["token"], "u1", "Tom", TENANT)
    assert ("issue", "issued") in gw.metrics


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "Bearer wrong-key-0123456789",
        f"Basic {API_KEY}",
        f"Bearer {API_KEY}x",
        "Bearer ",
        f"bearer {API_KEY[:-1]}",
    ],
)
async def test_wrong_api_key_401(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, auth: str | None
) -> None:
    gw = await make_gateway()
    headers = {"Authorization": auth} if auth is not None else {}
    async with http.post(
        gw.issue_url, json={"userId": "u1", "userName": "Tom"}, headers=headers
    ) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "token" not in await r.json()


async def test_bearer_scheme_is_case_insensitive(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway()
    headers = {"Authorization": f"bearer {API_KEY}"}
    async with http.post(gw.issue_url, json={"userId": "u", "userName": "n"}, headers=headers) as r:
        assert r.status == 200


async def test_api_key_guessing_locks_out(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway()  # max_failures=3
    bad = {"Authorization": "Bearer guess-guess-guess-guess"}
    # Concurrent wrong keys: each takes an attempt atomically, so exactly three are answered
    # 401 and the rest 429 (no test-then-record race).
    async def guess() -> int:
        async with http.post(gw.issue_url, json={}, headers=bad) as r:
            return r.status

    statuses = await asyncio.gather(*(guess() for _ in range(30)))
    assert sorted(statuses) == [401] * 3 + [429] * 27
    # The locked address is refused even with the right key (guesses learn nothing).
    async with http.post(gw.issue_url, json={"userId": "u", "userName": "n"}, headers=AUTH) as r:
        assert r.status == 429
        assert int(r.headers["Retry-After"]) >= 1
    # Lifted early by an operator: the right key works again at once.
    assert await gw.guard.unlock("address", "127.0.0.1")
    async with http.post(gw.issue_url, json={"userId": "u", "userName": "n"}, headers=AUTH) as r:
        assert r.status == 200


async def test_no_api_key_configured_is_404(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(api_key=None)
    async with http.post(gw.issue_url, json={"userId": "u1", "userName": "Tom"}, headers=AUTH) as r:
        assert r.status == 404
    async with http.delete(gw.issue_url, params={"token": "x" * 43}, headers=AUTH) as r:
        assert r.status == 404


@pytest.mark.parametrize(
    "payload",
    [
        {"userId": "u1"},
        {"userName": "Tom"},
        {"userId": "", "userName": "Tom"},
        {"userId": "u1", "userName": ["Tom"]},
        {"userId": True, "userName": "Tom"},
        ["u1", "Tom"],
        {"userId": "u" * 300, "userName": "Tom"},
    ],
)
async def test_issue_rejects_bad_payloads(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, payload: object
) -> None:
    gw = await make_gateway()
    async with http.post(gw.issue_url, json=payload, headers=AUTH) as r:
        assert r.status == 400


async def test_issue_accepts_numeric_user_id(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway()
    async with http.post(
        gw.issue_url, json={"userId": 10010001, "userName": "Tom"}, headers=AUTH
    ) as r:
        token = (await r.json())["token"]
    assert (await post_validate(http, gw, validate_body(token, "10010001")))[1]["retCode"] == 0


async def test_issue_needs_json(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway()
    async with http.post(gw.issue_url, data="userId=u1", headers=AUTH) as r:
        assert r.status == 415


@pytest.mark.parametrize("how", ["body", "query"])
async def test_delete_revokes(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, how: str
) -> None:
    gw = await make_gateway()
    token = (await issue_token(http, gw))["token"]
    assert (await post_validate(http, gw, validate_body(token)))[1]["retCode"] == 0
    kwargs: dict[str, object] = (
        {"json": {"token": token}} if how == "body" else {"params": {"token": token}}
    )
    async with http.delete(gw.issue_url, headers=AUTH, **kwargs) as r:  # type: ignore[arg-type]
        assert r.status == 204
    assert (await post_validate(http, gw, validate_body(token)))[1]["retCode"] == 1
    # Idempotent.
    async with http.delete(gw.issue_url, headers=AUTH, **kwargs) as r:  # type: ignore[arg-type]
        assert r.status == 204


async def test_delete_needs_key_and_token(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway()
    token = (await issue_token(http, gw))["token"]
    async with http.delete(gw.issue_url, json={"token": token}) as r:
        assert r.status == 401
    assert await gw.store.check(token, "u1", "Tom", TENANT)
    async with http.delete(gw.issue_url, json={}, headers=AUTH) as r:
        assert r.status == 400


async def test_other_methods_405(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway()
    async with http.get(gw.issue_url, headers=AUTH) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "POST, DELETE"


async def test_full_store_refuses_with_503(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(max_tokens=2)
    await issue_token(http, gw, "u1")
    await issue_token(http, gw, "u2")
    async with http.post(gw.issue_url, json={"userId": "u3", "userName": "n"}, headers=AUTH) as r:
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        assert await r.json() == {"error": "token store full"}
