"""Issue 4 end to end: token mode, the CEC callback and its guards, through the real gateway.

Identity comes from the enterprise-site stand-in's ``/api/me`` with the visitor's ``sid``
cookie; the CEC stand-in records what the gateway forwards; the callback is called like the
CEC would, over loopback. Redis is a real redis-server; the two-process case runs
``python -m gateway run -c FILE`` twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.integration.conftest import (
    API_KEY,
    CHANNEL,
    CLIENT,
    NEW_CLIENT,
    TENANT,
    VALIDATE,
    BrowserFactory,
    Site,
    guest_id_of,
    third_user_data,
    token_config,
)
from tests.redis_server import RedisServer
from tests.support.gateway import GatewayStarter
from tests.support.ports import free_port
from tests.support.process import clean_env, gateway_process
from tests.support.upstreams import RawRecorder

SUCCESS = {"retCode": 0, "message": "validate success"}
CONTEXT_SCRIPT = "/service-cloud/webclient/chat_client/js/cobrowseCommon.js"


def login(session: aiohttp.ClientSession, base: str, sid: str) -> None:
    """Put the site's session cookie in this browser's jar for the gateway's origin."""
    session.cookie_jar.update_cookies({"sid": sid}, URL(base))


async def inject(session: aiohttp.ClientSession, base: str, path: str = CLIENT,
                 **fields: Any) -> tuple[int, str]:
    async with session.post(f"{base}{path}?&t=123", json=third_user_data(**fields)) as resp:
        return resp.status, await resp.text()


async def validate(session: aiohttp.ClientSession, base: str, token: str, user_id: str,
                   user_name: str, tenant: str = TENANT, *, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    body = {"Token": token, "userName": user_name, "userId": user_id, "tenantSpaceId": tenant}
    async with session.post(base + VALIDATE, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), resp


async def issue(session: aiohttp.ClientSession, base: str, user_id: str, user_name: str
                ) -> dict[str, Any]:
    async with session.post(base + "/gateway/token", json={"userId": user_id,
                                                          "userName": user_name},
                            headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def test_logged_in_visitor_gets_site_identity_and_a_token_that_validates(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site,
        browser: BrowserFactory) -> None:
    site.sessions["sess-a"] = ("u-1001", "Alice Zhang")
    gw = await start_gateway(token_config(cec, site))
    b = browser()
    login(b, gw.url, "sess-a")
    status, text = await inject(b, gw.url, thirdUserId="evil", thirdUserName="Evil",
                                thirdUserToken="forged-token-from-the-page",
                                tenantSpaceId="999999999999", channelConfigId="888888888888")
    assert status == 200, text
    assert any("sid=sess-a" in c for c in site.me_calls)
    [got] = cec.posts_to(CLIENT)
    assert got.header("Content-Length") == str(len(got.body))
    body = got.json()
    assert (body["thirdUserId"], body["thirdUserName"]) == ("u-1001", "Alice Zhang")
    assert (body["tenantSpaceId"], body["channelConfigId"]) == (TENANT, CHANNEL)
    token = body["thirdUserToken"]
    assert token != "forged-token-from-the-page" and len(token) >= 22
    assert "thirdPartAuthorization" not in body  # token mode does not sign

    # The newer script path is rewritten the same way, with a token that is still valid.
    status, _ = await inject(b, gw.url, path=NEW_CLIENT, thirdUserId="evil")
    assert status == 200
    again = cec.posts_to(NEW_CLIENT)[0].json()
    assert (again["thirdUserId"], again["thirdUserName"]) == ("u-1001", "Alice Zhang")

    # The CEC calls back, from loopback, with what it was given.
    cec_side = browser()
    for tok in (token, again["thirdUserToken"]):
        status, answer, resp = await validate(cec_side, gw.url, tok, "u-1001", "Alice Zhang")
        assert (status, answer) == (200, SUCCESS)
        assert resp.headers["Cache-Control"] == "no-store"
    # The identity the page claimed is not what the token is bound to.
    status, answer, _ = await validate(cec_side, gw.url, token, "evil", "Evil")
    assert answer["retCode"] != 0

    # The loader knows who the visitor is, but never carries a token (any site could
    # include the script and read it).
    async with b.get(gw.url + "/gateway/chat.js") as resp:
        js = await resp.text()
    assert "u-1001" in js and "Alice Zhang" in js
    assert token not in js and again["thirdUserToken"] not in js


async def test_anonymous_visitor_gets_401_and_nothing_is_forwarded(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site,
        browser: BrowserFactory) -> None:
    site.sessions["sess-a"] = ("u-1001", "Alice")
    gw = await start_gateway(token_config(cec, site))
    anonymous, stale = browser(), browser()
    login(stale, gw.url, "expired-session")
    for b in (anonymous, stale):
        for path in (CLIENT, NEW_CLIENT):
            status, text = await inject(b, gw.url, path=path)
            assert status == 401, text
            assert "log in" in text.lower()
    assert cec.requests == []
    # A header claiming an identity is not an identity.
    async with anonymous.post(gw.url + CLIENT, json=third_user_data(),
                              headers={"X-User-Id": "u-1001", "X-Forwarded-User": "u-1001",
                                       "Authorization": "Bearer u-1001"}) as resp:
        assert resp.status == 401
    assert cec.requests == []


async def test_anonymous_visitor_falls_back_to_guest(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site,
        browser: BrowserFactory) -> None:
    gw = await start_gateway(token_config(cec, site, fallback=True))
    b = browser()
    # The page loads the loader first, which hands out the guest cookie.
    async with b.get(gw.url + "/gateway/chat.js") as resp:
        assert resp.status == 200
    guest_id = guest_id_of(b)
    assert guest_id is not None and guest_id.startswith("guest-")
    status, text = await inject(b, gw.url, thirdUserId="u-1001", thirdUserName=" Visitor ")
    assert status == 200, text
    assert guest_id_of(b) == guest_id
    body = cec.posts_to(CLIENT)[0].json()
    assert body["thirdUserId"] == guest_id
    assert body["thirdUserName"] == "Visitor"
    status, answer, _ = await validate(browser(), gw.url, body["thirdUserToken"], guest_id,
                                       "Visitor")
    assert answer == SUCCESS
    # Without a valid guest cookie (a page posting before the loader ran, a flood): a 307
    # to the same target with a new guest cookie; no token minted, nothing forwarded.
    before = len(cec.requests)
    async with browser().post(f"{gw.url}{CLIENT}?&t=1", json=third_user_data(),
                              allow_redirects=False) as resp:
        assert resp.status == 307 and resp.headers["Location"] == f"{CLIENT}?&t=1"
        assert "cec_guest=" in resp.headers["Set-Cookie"]
    assert len(cec.requests) == before
    # A browser follows it with the cookie, and chats as that guest.
    follower = browser()
    assert (await inject(follower, gw.url))[0] == 200
    assert cec.posts_to(CLIENT)[-1].json()["thirdUserId"] == guest_id_of(follower)


async def test_each_wrong_field_is_refused_alike(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site,
        browser: BrowserFactory) -> None:
    gw = await start_gateway(token_config(cec, site))
    b = browser()
    token = (await issue(b, gw.url, "u-7", "Bob"))["token"]
    wrong = [
        (token[:-1] + ("A" if token[-1] != "A" else "B"), "u-7", "Bob", TENANT),
        (token, "u-8", "Bob", TENANT),
        (token, "u-7", "Bob ", TENANT),
        (token, "u-7", "bob", TENANT),
        (token, "u-7", "Bob", "999999999999"),
        ("", "u-7", "Bob", TENANT),
    ]
    answers = []
    for args in wrong:
        status, answer, _ = await validate(b, gw.url, *args)
        assert answer["retCode"] != 0, args
        answers.append((status, answer))
    assert len(set(map(repr, answers))) == 1  # the answer never says which part was wrong
    status, answer, _ = await validate(b, gw.url, token, "u-7", "Bob")
    assert answer == SUCCESS
    # Not JSON, too big: refused with a non-zero retCode too.
    async with b.post(gw.url + VALIDATE, data=b"Token=x",
                      headers={"Content-Type": "application/x-www-form-urlencoded"}) as resp:
        assert resp.status == 415
        assert (await resp.json(content_type=None))["retCode"] != 0
    async with b.post(gw.url + VALIDATE, json={"Token": "x" * 5000}) as resp:
        assert resp.status == 413
        assert (await resp.json(content_type=None))["retCode"] != 0


async def test_issue_and_revoke_with_the_api_key(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site,
        browser: BrowserFactory) -> None:
    gw = await start_gateway(token_config(cec, site))
    b = browser()
    issued = await issue(b, gw.url, "u-9", "Carol")
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$", issued["expiresAt"])
    token = issued["token"]
    assert (await validate(b, gw.url, token, "u-9", "Carol"))[1] == SUCCESS

    for auth in (None, "Bearer wrong-key-0123456789", f"Basic {API_KEY}"):
        headers = {"Authorization": auth} if auth else {}
        async with b.post(gw.url + "/gateway/token", json={"userId": "u", "userName": "n"},
                          headers=headers) as resp:
            assert resp.status == 401
            assert "token" not in await resp.json()
        async with b.delete(gw.url + "/gateway/token", json={"token": token},
                            headers=headers) as resp:
            assert resp.status == 401
    assert (await validate(b, gw.url, token, "u-9", "Carol"))[1] == SUCCESS

    async with b.delete(gw.url + "/gateway/token", json={"token": token},
                        headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        assert resp.status == 204
    _, answer, _ = await validate(b, gw.url, token, "u-9", "Carol")
    assert answer["retCode"] != 0


async def test_allow_list_refuses_loopback_when_not_listed(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site,
        browser: BrowserFactory) -> None:
    gw = await start_gateway(token_config(cec, site, allow_from="[10.0.0.0/8]"))
    b = browser()
    token = (await issue(b, gw.url, "u-1", "Dan"))["token"]  # issuing is not allow-listed
    status, answer, _ = await validate(b, gw.url, token, "u-1", "Dan")
    assert status == 403 and answer["retCode"] != 0
    # A header cannot talk its way in: loopback is not a trusted proxy here.
    status, answer, _ = await validate(b, gw.url, token, "u-1", "Dan",
                                       headers={"X-Forwarded-For": "10.1.2.3",
                                                "X-Real-IP": "10.1.2.3"})
    assert status == 403


async def test_allow_list_uses_the_real_client_address(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site,
        browser: BrowserFactory) -> None:
    # 127.0.0.1 is a trusted proxy (a load balancer); 127.0.0.2 is an ordinary client.
    # Both connect for real, from their own source addresses.
    proxy, outsider = browser(), browser(local_addr=("127.0.0.2", 0))

    # Only 127.0.0.1 may call back: an untrusted peer claiming to be 127.0.0.1 is refused.
    gw = await start_gateway(token_config(cec, site, trusted="[127.0.0.1/32]",
                                          allow_from="[127.0.0.1/32]"))
    token = (await issue(proxy, gw.url, "u-1", "Eve"))["token"]
    assert (await validate(proxy, gw.url, token, "u-1", "Eve"))[1] == SUCCESS
    status, _, _ = await validate(outsider, gw.url, token, "u-1", "Eve",
                                  headers={"X-Forwarded-For": "127.0.0.1"})
    assert status == 403
    # The trusted proxy relaying an outside client: the client's address is what counts.
    for xff in ("6.6.6.6", "127.0.0.1, 6.6.6.6"):
        status, _, _ = await validate(proxy, gw.url, token, "u-1", "Eve",
                                      headers={"X-Forwarded-For": xff})
        assert status == 403, xff

    # Only 127.0.0.3 (behind the trusted proxy) may call back.
    gw2 = await start_gateway(token_config(cec, site, trusted="[127.0.0.1/32]",
                                           allow_from="[127.0.0.3/32]"))
    token = (await issue(proxy, gw2.url, "u-2", "Fay"))["token"]
    status, _, _ = await validate(proxy, gw2.url, token, "u-2", "Fay")
    assert status == 403  # the proxy itself is not the CEC
    status, answer, _ = await validate(proxy, gw2.url, token, "u-2", "Fay",
                                       headers={"X-Forwarded-For": "127.0.0.3"})
    assert (status, answer) == (200, SUCCESS)
    # Spoofing the leftmost entry through the trusted proxy does not help (walk from the right).
    status, _, _ = await validate(proxy, gw2.url, token, "u-2", "Fay",
                                  headers={"X-Forwarded-For": "127.0.0.3, 6.6.6.6"})
    assert status == 403
    status, _, _ = await validate(outsider, gw2.url, token, "u-2", "Fay",
                                  headers={"X-Forwarded-For": "127.0.0.3"})
    assert status == 403


async def test_wrong_tokens_past_the_allowance_never_refuse_a_correct_token(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site,
        browser: BrowserFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gw = await start_gateway(token_config(
        cec, site, guard="{max_failures: 3, window: 1m, lockout: 30s}"))
    b = browser()
    token = (await issue(b, gw.url, "u-5", "Gus"))["token"]
    other = (await issue(b, gw.url, "u-6", "Hal"))["token"]
    for i in range(3):
        status, answer, _ = await validate(b, gw.url, f"guess-{i}-abcdefghijklmnop", "u-5", "Gus")
        assert (status, answer["retCode"] != 0) == (200, True)
    status, answer, resp = await validate(b, gw.url, "guess-3-abcdefghijklmnop", "u-5", "Gus")
    assert status == 429 and answer["retCode"] != 0
    assert 1 <= int(resp.headers["Retry-After"]) <= 30
    # The user's own token, and everyone else's, from the same (allow-listed) caller: valid.
    assert (await validate(b, gw.url, token, "u-5", "Gus"))[1] == SUCCESS
    assert (await validate(b, gw.url, other, "u-6", "Hal"))[1] == SUCCESS
    # Logged with the userId and a reason, never with a token.
    assert "'u-5'" in caplog.text and "answered 429" in caplog.text
    assert token not in caplog.text and other not in caplog.text
    assert "guess-0-abcdefghijklmnop" not in caplog.text


# ------------------------------------------------------------------ Redis


async def test_redis_down_fails_closed_while_proxying_continues(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site, browser: BrowserFactory,
        redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    site.sessions["sess-r"] = ("u-31", "Ida")
    gw = await start_gateway(token_config(cec, site, store=redis.url))
    b = browser()
    login(b, gw.url, "sess-r")
    assert (await inject(b, gw.url))[0] == 200
    token = cec.posts_to(CLIENT)[0].json()["thirdUserToken"]
    assert (await validate(b, gw.url, token, "u-31", "Ida"))[1] == SUCCESS

    port = redis.port
    redis.stop()
    status, answer, _ = await validate(b, gw.url, token, "u-31", "Ida")
    assert status == 503 and answer["retCode"] != 0
    assert "unavailable" in caplog.text
    # The proxy keeps serving the site and the CEC's plain traffic.
    async with b.get(gw.url + "/products/1") as resp:
        assert resp.status == 200
        assert "site page /products/1" in await resp.text()
    async with b.get(gw.url + CONTEXT_SCRIPT) as resp:
        assert resp.status == 200
    # No token can be minted: the chat script request fails closed, nothing half-done is sent.
    before = len(cec.posts_to(CLIENT))
    assert (await inject(b, gw.url))[0] == 503
    assert len(cec.posts_to(CLIENT)) == before

    redis.start(port=port)  # back, empty: old tokens are gone, new ones work
    assert (await inject(b, gw.url))[0] == 200
    fresh = cec.posts_to(CLIENT)[-1].json()["thirdUserToken"]
    assert (await validate(b, gw.url, fresh, "u-31", "Ida"))[1] == SUCCESS


@contextlib.asynccontextmanager
async def gateway_url(config_text: str, workdir: Path) -> AsyncIterator[str]:
    """``python -m gateway run -c FILE`` (as many workers as the config says) until the
    context ends; yields its base URL."""
    async with gateway_process(config_text, workdir, one_worker=False, env=clean_env()) as gw:
        yield gw.url


async def test_two_gateway_processes_share_tokens_and_guess_counts_through_redis(
        cec: RawRecorder, site: Site, browser: BrowserFactory, redis: RedisServer,
        tmp_path: Path) -> None:
    site.sessions["sess-2"] = ("u-77", "Jun")
    guard = "{max_failures: 3, window: 1m, lockout: 30s}"
    port_a, port_b = free_port(), free_port()
    async with contextlib.AsyncExitStack() as stack:
        a, b = await asyncio.gather(*(
            stack.enter_async_context(gateway_url(
                token_config(cec, site, store=redis.url, guard=guard, port=port,
                             workers=True), tmp_path / name))
            for name, port in (("a", port_a), ("b", port_b))))
        visitor, caller = browser(), browser()

        # Issued on A through the proxy path (logged-in visitor), validated on B.
        login(visitor, a, "sess-2")
        assert (await inject(visitor, a))[0] == 200
        token = cec.posts_to(CLIENT)[0].json()["thirdUserToken"]
        assert (await validate(caller, b, token, "u-77", "Jun"))[1] == SUCCESS
        # Issued on B with the API key, validated on A; revoked on A, refused on B.
        api_token = (await issue(caller, b, "u-78", "Kim"))["token"]
        assert (await validate(caller, a, api_token, "u-78", "Kim"))[1] == SUCCESS
        async with caller.delete(a + "/gateway/token", json={"token": api_token},
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            assert resp.status == 204
        status, answer, _ = await validate(caller, b, api_token, "u-78", "Kim")
        assert (status, answer["retCode"] != 0) == (200, True)

        # Wrong tokens for u-77 spread over both processes add up against that userId; its
        # own token still validates on both.
        for n, base in enumerate((a, b, a)):
            status, answer, _ = await validate(caller, base, f"guess-{n}-abcdefghijklmnop",
                                               "u-77", "Jun")
            assert (status, answer["retCode"] != 0) == (200, True)  # within the allowance
        for base in (a, b):
            status, answer, resp = await validate(caller, base, "guess-000000000000000",
                                                  "u-77", "Jun")
            assert status == 429 and answer["retCode"] != 0, base
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await validate(caller, base, token, "u-77", "Jun"))[1] == SUCCESS
