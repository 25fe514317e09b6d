"""Issue 3 end to end: guest chat through the real gateway, on real sockets.

The browser (aiohttp sessions with their own cookie jars) talks to the gateway; the CEC
stand-in records what the gateway forwards; signatures are checked with the test's own
auth-v2 implementation, itself checked against the SPEC vectors first.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.integration.conftest import (
    CHANNEL,
    NEW_CLIENT,
    SECRET,
    SPEC_SECRET,
    TENANT,
    TIMESTAMP_RE,
    BrowserFactory,
    Site,
    guest_config,
    guest_id_of,
    spec_payload,
    spec_sign,
    third_user_data,
    verify_authorization,
)
from tests.support.gateway import GatewayStarter
from tests.support.process import clean_env, gateway_cli
from tests.support.upstreams import RawRecorder

VECTOR_TS = "2026-11-24T08:30:15.123Z"
VECTOR_1 = ('{"thirdUserName":"Tom","thirdUserId":"10010001","tenantSpaceId":"202007159031",'
            '"channelConfigId":"202011230001"}')
VECTOR_1_AUTH = ("auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/"
                 "bb22f7612ab6d3a91f2eb4011042ba86d7dc98bb29b6c6569004093e01f75c13")
VECTOR_2 = ('{"thirdUserName":"张三 & \\"Bob\\"","thirdUserId":"guest-7f3a",'
            '"tenantSpaceId":"202007159031","channelConfigId":"202011230001"}')
VECTOR_2_AUTH = ("auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/"
                 "82556873c7d8154371d9c2bf216744e90510d93782e6876e483a171b88817aae")


def test_independent_verifier_matches_spec_vectors() -> None:
    # The verifier the other tests trust must itself be right.
    assert len(VECTOR_1.encode()) == 112 and len(VECTOR_2.encode()) == 127
    assert spec_sign(SPEC_SECRET, CHANNEL, VECTOR_TS, VECTOR_1) == VECTOR_1_AUTH
    assert spec_sign(SPEC_SECRET, CHANNEL, VECTOR_TS, VECTOR_2) == VECTOR_2_AUTH
    assert spec_payload("Tom", "10010001") == VECTOR_1


async def _post(session: aiohttp.ClientSession, url: str, data: Any = None, *,
                raw: bytes | None = None, path: str = NEW_CLIENT + "?&t=123",
                ) -> tuple[int, str, aiohttp.ClientResponse]:
    body = raw if raw is not None else json.dumps(data, ensure_ascii=False).encode()
    # encoded=True: sent exactly as written (yarl would otherwise decode %2E and the like).
    async with session.post(URL(url + path, encoded=True), data=body,
                            headers={"Content-Type": "application/json;charset=UTF-8"}) as resp:
        return resp.status, await resp.text(), resp


@pytest.fixture
async def gw(start_gateway: GatewayStarter, cec: RawRecorder, site: Site) -> Any:
    return await start_gateway(guest_config(cec, site))


async def test_injection_forces_identity_signs_and_sets_cookie(
        gw: Any, cec: RawRecorder, browser: BrowserFactory) -> None:
    b = browser()
    before = datetime.now(UTC)
    sent = third_user_data(thirdUserName="  Alice \t", tenantSpaceId="999999999999",
                           channelConfigId="888888888888", thirdUserId="admin",
                           secretKey=SECRET, extraField={"kept": True})
    status, text, resp = await _post(b, gw.url, sent)
    assert status == 200, text
    assert resp.content_type == "application/javascript"

    # The guest cookie: signed id, HttpOnly, SameSite=Lax, whole site.
    cookies = resp.headers.getall("Set-Cookie")
    assert len(cookies) == 1
    attrs = [a.strip().lower() for a in cookies[0].split(";")]
    assert attrs[0].startswith("cec_guest=guest-")
    assert "httponly" in attrs and "samesite=lax" in attrs and "path=/" in attrs
    guest_id = guest_id_of(b)
    assert guest_id is not None

    [got] = cec.posts_to(NEW_CLIENT)
    assert got.query == "&t=123"
    assert got.header("Content-Length") == str(len(got.body))
    body = got.json()
    assert body["tenantSpaceId"] == TENANT
    assert body["channelConfigId"] == CHANNEL
    assert body["thirdUserId"] == guest_id
    assert body["thirdUserName"] == "Alice"
    assert "secretKey" not in body and SECRET.encode() not in got.body
    assert body["extraField"] == {"kept": True}
    assert body["locale"] == "en" and body["timestamp"] == 1700000000000

    auth = body["thirdPartAuthorization"]
    assert verify_authorization(auth, "Alice", guest_id)
    _, access_key, stamp, signed, _ = auth.split("/")
    assert access_key == CHANNEL and signed == "content-length;content-type"
    assert TIMESTAMP_RE.match(stamp)
    signed_at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=2) <= signed_at <= datetime.now(UTC) + timedelta(seconds=2)
    # The answer is the CEC's, passed through (it echoes what it was sent).
    assert guest_id in text


async def test_guest_cookie_stable_per_browser_and_distinct_across_browsers(
        gw: Any, cec: RawRecorder, browser: BrowserFactory) -> None:
    first, second = browser(), browser()
    s1, _, r1 = await _post(first, gw.url, third_user_data())
    s2, _, r2 = await _post(first, gw.url, third_user_data())
    s3, _, r3 = await _post(second, gw.url, third_user_data())
    assert (s1, s2, s3) == (200, 200, 200)
    assert "Set-Cookie" in r1.headers
    assert "Set-Cookie" not in r2.headers  # the cookie was sent back and re-used
    assert "Set-Cookie" in r3.headers
    ids = [r.json()["thirdUserId"] for r in cec.posts_to(NEW_CLIENT)]
    assert ids[0] == ids[1] == guest_id_of(first)
    assert ids[2] == guest_id_of(second) != ids[0]


async def test_tampered_guest_cookie_gets_a_new_id(
        gw: Any, cec: RawRecorder, browser: BrowserFactory) -> None:
    b = browser()
    async with b.post(gw.url + NEW_CLIENT, json=third_user_data(),
                      headers={"Cookie": "cec_guest=guest-00000000000000000000.forged"}) as resp:
        assert resp.status == 200
        assert resp.headers["Set-Cookie"].startswith("cec_guest=guest-")
    [got] = cec.posts_to(NEW_CLIENT)
    assert got.json()["thirdUserId"] != "guest-00000000000000000000"
    assert got.json()["thirdUserId"] == guest_id_of(b)


async def test_user_name_default_trim_and_limit(
        gw: Any, cec: RawRecorder, browser: BrowserFactory) -> None:
    b = browser()
    await _post(b, gw.url, third_user_data(thirdUserName=None))
    await _post(b, gw.url, third_user_data(thirdUserName="   "))
    await _post(b, gw.url, third_user_data(thirdUserName=" " + "N" * 300 + " "))
    await _post(b, gw.url, third_user_data(thirdUserName="张三 & \"Bob\"\u202e"))
    guest_id = guest_id_of(b)
    assert guest_id is not None
    names = [r.json()["thirdUserName"] for r in cec.posts_to(NEW_CLIENT)]
    default = "Guest-" + guest_id.removeprefix("guest-")[:6]
    assert names == [default, default, "N" * 64, "张三 & \"Bob\""]
    for got in cec.posts_to(NEW_CLIENT):
        body = got.json()
        assert verify_authorization(body["thirdPartAuthorization"], body["thirdUserName"],
                                    guest_id)


@pytest.mark.parametrize("asked", [
    {"tenantSpaceId": "999999999999"},
    {"channelConfigId": "888888888888"},
    {"thirdUserId": "victim-user"},
    {"thirdUserId": "victim-user", "tenantSpaceId": "999999999999",
     "channelConfigId": "888888888888"},
    # look-alike keys a lenient parser downstream might prefer
    {"ThirdUserId": "victim-user", "TENANTSPACEID": "999999999999",
     "\uff43hannelConfigId": "888888888888", "thirdUser\u200bId": "victim-user"},
    {"thirdUserId": ["victim-user"], "tenantSpaceId": {"x": 1}},
])
async def test_not_a_signing_oracle(gw: Any, cec: RawRecorder, browser: BrowserFactory,
                                    asked: dict[str, Any]) -> None:
    b = browser()
    for path in (NEW_CLIENT, "/gateway/authorization"):
        status, text, _ = await _post(b, gw.url, third_user_data(**asked), path=path)
        assert status == 200, text
    guest_id = guest_id_of(b)
    assert guest_id is not None
    [got] = cec.posts_to(NEW_CLIENT)
    body = got.json()
    assert (body["tenantSpaceId"], body["channelConfigId"], body["thirdUserId"]) == (
        TENANT, CHANNEL, guest_id)
    assert not {k for k in body if k not in third_user_data() and k != "thirdPartAuthorization"}
    # Both signatures (forwarded, and answered as text) sign the forced identity only.
    for auth in (body["thirdPartAuthorization"], text):
        assert verify_authorization(auth, "Tom", guest_id)
        wanted_user = asked.get("thirdUserId")
        for user in {guest_id, wanted_user if isinstance(wanted_user, str) else "victim-user"}:
            for tenant in (TENANT, "999999999999"):
                for channel in (CHANNEL, "888888888888"):
                    if (user, tenant, channel) == (guest_id, TENANT, CHANNEL):
                        continue
                    assert not verify_authorization(auth, "Tom", user, tenant=tenant,
                                                    channel=channel)


@pytest.mark.parametrize("path", [
    "/service-cloud//webclient/chat_client/js/newThirdPartyClient.js",
    "/service-cloud/webclient/chat_client/js/../js/newThirdPartyClient.js",
    "/service-cloud/webclient/chat_client/js/./newThirdPartyClient.js",
])
async def test_other_spellings_of_the_script_path_are_rewritten_too(
        gw: Any, cec: RawRecorder, browser: BrowserFactory, path: str) -> None:
    # The CEC may normalise, decode or drop path parameters before serving the script: a
    # spelling the gateway does not recognise would forward the page's identity unsigned.
    b = browser()
    status, text, _ = await _post(b, gw.url, third_user_data(thirdUserId="victim-user",
                                                             secretKey=SECRET), path=path)
    assert status == 200, text
    [got] = cec.requests
    body = got.json()
    assert body["thirdUserId"] == guest_id_of(b) != "victim-user"
    assert "secretKey" not in body
    assert verify_authorization(body["thirdPartAuthorization"], "Tom", body["thirdUserId"])


@pytest.mark.parametrize("path", [
    "/service-cloud/webclient/chat_client/js/newThirdPartyClient%2Ejs",
    "/service-cloud/webclient/chat_client/js/%6eewThirdPartyClient.js",
    "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js;jsessionid=1",
    "/service-cloud/webclient;x=1/chat_client/js/newThirdPartyClient.js",
])
async def test_spellings_the_cec_may_read_as_the_script_are_refused(
        gw: Any, cec: RawRecorder, browser: BrowserFactory, path: str) -> None:
    # The CEC may decode or drop path parameters before serving the script: only the exact
    # path is rewritten, so every other spelling is refused and nothing reaches the CEC.
    b = browser()
    status, _, _ = await _post(b, gw.url, third_user_data(thirdUserId="victim-user"), path=path)
    assert status == 404
    assert cec.requests == []


@pytest.mark.parametrize("raw", [
    b"{not json",
    b"",
    b"[1, 2, 3]",
    b'"a string"',
    b'{"thirdUserName": NaN}',
    b"\xff\xfe{}",
    b'{"thirdUserName": "' + b"x" * (16 * 1024) + b'"}',
], ids=["broken", "empty", "array", "string", "nan", "not-utf8", "over-16k"])
@pytest.mark.parametrize("path", [NEW_CLIENT + "?&t=1", "/gateway/authorization"])
async def test_bad_json_is_400_and_nothing_forwarded(
        gw: Any, cec: RawRecorder, browser: BrowserFactory, raw: bytes, path: str) -> None:
    status, text, _ = await _post(browser(), gw.url, raw=raw, path=path)
    assert status == 400, text
    assert text.startswith("400 Bad Request")
    assert len(text) < 200
    assert cec.requests == []


async def test_oversized_streamed_body_is_400_and_nothing_forwarded(
        gw: Any, cec: RawRecorder, browser: BrowserFactory) -> None:
    async def chunks() -> Any:  # no Content-Length: chunked, the limit is found while reading
        yield b'{"thirdUserName": "'
        for _ in range(20):
            yield b"y" * 1024
        yield b'"}'

    async with browser().post(gw.url + NEW_CLIENT, data=chunks()) as resp:
        assert resp.status == 400
    assert cec.requests == []


async def test_authorization_endpoint_answers_signature_over_forced_identity(
        gw: Any, cec: RawRecorder, browser: BrowserFactory) -> None:
    b = browser()
    status, text, resp = await _post(b, gw.url, third_user_data(thirdUserName=" Page User "),
                                     path="/gateway/authorization")
    assert status == 200
    assert resp.content_type == "text/plain"
    assert resp.headers["Cache-Control"] == "no-store"
    guest_id = guest_id_of(b)
    assert guest_id is not None
    assert verify_authorization(text, "Page User", guest_id)
    assert cec.requests == []  # answered by the gateway itself

    # The page then posts with that signature; the gateway re-signs for the same guest.
    status, _, _ = await _post(b, gw.url, third_user_data(thirdUserName=" Page User ",
                                                          thirdPartAuthorization=text))
    assert status == 200
    body = cec.posts_to(NEW_CLIENT)[0].json()
    assert body["thirdUserId"] == guest_id
    assert verify_authorization(body["thirdPartAuthorization"], "Page User", guest_id)

    async with b.get(gw.url + "/gateway/authorization") as resp:
        assert resp.status == 405


async def test_loader_and_page_served(gw: Any, browser: BrowserFactory) -> None:
    b = browser()
    async with b.get(gw.url + "/gateway/chat.js") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/javascript"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        js = await resp.text()
    for name in ("$ContextPath", "$aicc_ContextPath", "thirdUserData", "importScript",
                 "thirdValidate", "configId", "tenantSpaceId", "newThirdPartyClient.js"):
        assert name in js, name
    assert TENANT in js and CHANNEL in js
    assert "jQuery" not in js and "axios" not in js
    async with b.get(gw.url + "/chat/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.headers["Cache-Control"] == "no-store"
        page = await resp.text()
    assert re.search(r"<script nonce=\"[A-Za-z0-9_-]+\" src=\"/gateway/chat.js\"", page)
    # The loader and page share the visitor's guest id, from the cookie set by the loader.
    guest_id = guest_id_of(b)
    assert guest_id is not None and guest_id in js and guest_id in page

    # Included from another site, the loader does not reveal (or mint) the visitor's id.
    async with b.get(gw.url + "/gateway/chat.js", headers={"Sec-Fetch-Site": "cross-site"}
                     ) as resp:
        assert resp.status == 200
        assert "Set-Cookie" not in resp.headers
        assert guest_id not in await resp.text()


async def test_hostile_display_name_is_escaped(
        start_gateway: GatewayStarter, cec: RawRecorder, site: Site,
        browser: BrowserFactory) -> None:
    hostile = '"</script><img src=x onerror=alert(1)>'
    site.sessions["s1"] = ("u-42", hostile)
    running = await start_gateway(guest_config(
        cec, site, cec_extra=f"  identity: {{source: url, url: {{url: '{site.url}/api/me'}}}}"))
    b = browser()
    headers = {"Cookie": "sid=s1"}
    async with b.get(running.url + "/gateway/chat.js", headers=headers) as resp:
        assert resp.status == 200
        js = await resp.text()
    async with b.get(running.url + "/chat/", headers=headers) as resp:
        assert resp.status == 200
        page = await resp.text()
    assert site.me_calls  # the identity really came from the site
    assert "u-42" in js and "u-42" in page
    for text in (js, page):
        assert "</script><img" not in text
        assert "<img src=x" not in text
    assert "\\u003c/script\\u003e\\u003cimg src=x onerror=alert(1)\\u003e" in js
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page

    # On the proxy path the site's name is signed, whatever the page claims.
    async with b.post(running.url + NEW_CLIENT, json=third_user_data(thirdUserName="Mallory"),
                      headers=headers) as resp:
        assert resp.status == 200
    body = cec.posts_to(NEW_CLIENT)[-1].json()
    assert (body["thirdUserId"], body["thirdUserName"]) == ("u-42", hostile)
    assert verify_authorization(body["thirdPartAuthorization"], hostile, "u-42")


async def test_sign_cli_spec_vector_1() -> None:
    args = ("sign", "--access-key", CHANNEL, "--timestamp", VECTOR_TS, "--payload", VECTOR_1)
    (code, out, err), (code_without, out_without, err_without) = await asyncio.gather(
        gateway_cli(*args, env={**clean_env(), "CEC_SECRET_KEY": SPEC_SECRET}),
        gateway_cli(*args, env=clean_env()))
    assert code == 0, err
    assert out.strip() == VECTOR_1_AUTH
    assert SPEC_SECRET not in err
    # Without the secret in the environment: refused, with a hint, and nothing printed.
    assert code_without != 0
    assert out_without == "" and "CEC_SECRET_KEY" in err_without
