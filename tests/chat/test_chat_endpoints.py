"""The chat endpoints on a real aiohttp server, with a real echo upstream behind the rewrite.

The test server stands in for the gateway core: gateway-owned paths go to the handlers,
POSTs to the rewrite paths go through ``ChatEndpoints.rewrite`` and are forwarded to the echo
upstream, which answers with what it received.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer

from gateway.chat.endpoints import ChatEndpoints, NotLoggedIn, signer_from_config
from gateway.chat.guest import GUEST_ID_RE, GuestCookies
from gateway.chat.inject import InjectionError
from gateway.config import CecAuth, CecConfig, CecIdentity
from gateway.errors import RetryWithCookie
from gateway.signing import Signer

SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
TENANT = "202007159031"
CHANNEL = "202011230001"
NEW_CLIENT = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"
CLIENT = "/service-cloud/webclient/chat_client/js/thirdPartyClient.js"
HOSTILE = '"</script><img src=x onerror=alert(1)>'
COOKIE_KEY = b"cookie-key-for-tests-0123456789"


def independent_verify(authorization: str, *, name: str, user_id: str) -> bool:
    """Recompute the auth-v2 signature over the forced identity, without gateway.signing."""
    m = re.fullmatch(r"auth-v2/([^/]+)/([^/]+)/content-length;content-type/([0-9a-f]{64})",
                     authorization)
    if m is None or m.group(1) != CHANNEL:
        return False
    ts = m.group(2)
    payload = json.dumps(
        {"thirdUserName": name, "thirdUserId": user_id, "tenantSpaceId": TENANT,
         "channelConfigId": CHANNEL},
        ensure_ascii=False, separators=(",", ":"),
    )
    prefix = f"auth-v2/{CHANNEL}/{ts}/content-length;content-type"
    key = hmac.new(SECRET.encode(), prefix.encode(), hashlib.sha256).hexdigest()
    canon = "\n".join([
        "POST", NEW_CLIENT, "content-length;content-type",
        f"content-length:{len(payload.encode())}\n"
        f"content-type:{quote('application/json;charset=UTF-8', safe='')}",
        quote(payload, safe=""),
    ])
    expected = hmac.new(key.encode(), canon.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, m.group(3))


def make_cec(**kw: Any) -> CecConfig:
    args: dict[str, Any] = {
        "tenant_space_id": TENANT,
        "channel_config_id": CHANNEL,
        "auth": CecAuth(secret_key=SECRET),
    }
    args.update(kw)
    return CecConfig(**args)


@dataclass
class Site:
    url: Callable[[str], str]
    chat: ChatEndpoints
    upstream_hits: list[dict[str, Any]]


Factory = Callable[..., Awaitable[Site]]


@pytest.fixture
async def site() -> AsyncIterator[Factory]:
    servers: list[RawTestServer] = []
    hits: list[dict[str, Any]] = []

    async def echo(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        hits.append({"path": request.path, "body": body,
                     "content_length": request.headers.get("Content-Length")})
        return web.Response(text="/* chat script */", content_type="application/javascript")

    upstream = RawTestServer(echo)
    await upstream.start_server()
    servers.append(upstream)

    async def make(**kw: Any) -> Site:
        cec = kw.pop("cec", None) or make_cec()
        signer = kw.pop("signer", signer_from_config(cec))
        chat = ChatEndpoints(cec, signer, GuestCookies(COOKIE_KEY, cec.guest.cookie_name), **kw)
        routes = chat.endpoints()
        routes["/direct/authorization"] = chat.authorization  # even when not listed
        rewrites = set(chat.rewrite_paths())

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            route = routes.get(request.path)
            if route is not None:
                return await route(request)
            if request.method == "POST" and request.path in rewrites:
                try:
                    body, extra = await chat.rewrite(request, await request.read())
                except InjectionError as exc:
                    return web.Response(status=400, text=f"400 Bad Request: {exc}\n")
                except NotLoggedIn:
                    return web.Response(status=401, text="401 Unauthorized\n")
                except RetryWithCookie as exc:  # as the core answers it
                    return web.Response(status=307, headers={
                        "Location": request.raw_path, "Set-Cookie": exc.set_cookie,
                        "Cache-Control": "no-store"})
                async with aiohttp.ClientSession() as s, s.post(
                    str(upstream.make_url(request.path_qs)), data=body,
                    headers={"Content-Type": "application/json;charset=UTF-8"},
                ) as up:
                    resp = web.Response(body=await up.read(), content_type="application/javascript")
                for name, value in extra:
                    resp.headers.add(name, value)
                return resp
            return web.Response(status=404, text="404 Not Found\n")

        srv = RawTestServer(handler)
        await srv.start_server()
        servers.append(srv)
        return Site(lambda p: str(srv.make_url(p)), chat, hits)

    try:
        yield make
    finally:
        for s in servers:
            await s.close()


def browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def loader_settings(js: str) -> Any:
    m = re.search(r"var settings = (.*?);\n", js)
    assert m is not None
    return json.loads(m.group(1))


async def test_loader_served_with_guest_cookie(site: Factory) -> None:
    s = await site()
    async with browser() as b:
        async with b.get(s.url("/gateway/chat.js")) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/javascript; charset=utf-8"
            assert r.headers["Cache-Control"] == "no-store"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            cookie = r.headers["Set-Cookie"]
            js = await r.text()
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        settings = loader_settings(js)
        assert GUEST_ID_RE.match(settings["userId"])
        assert settings["userName"] == "Guest-" + settings["userId"][6:12]
        assert settings == {
            "contextPath": "/service-cloud", "mode": "authorization", "configId": CHANNEL,
            "tenantSpaceId": TENANT, "locale": "zh", "mapService": "tencent",
            "userId": settings["userId"], "userName": settings["userName"], "token": None,
            "cobrowse": False,
        }
        # The same browser keeps its id and gets no new cookie.
        async with b.get(s.url("/gateway/chat.js")) as r:
            assert "Set-Cookie" not in r.headers
            assert loader_settings(await r.text())["userId"] == settings["userId"]
    # Another browser gets another id.
    async with browser() as other, other.get(s.url("/gateway/chat.js")) as r:
        assert loader_settings(await r.text())["userId"] != settings["userId"]


async def test_loader_methods_and_head(site: Factory) -> None:
    s = await site()
    async with browser() as b:
        async with b.post(s.url("/gateway/chat.js")) as r:
            assert r.status == 405
            assert r.headers["Allow"] == "GET, HEAD"
        async with b.head(s.url("/gateway/chat.js")) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/javascript")
            assert await r.read() == b""


async def test_loader_cross_site_carries_no_identity(site: Factory) -> None:
    async def identify(_r: web.BaseRequest) -> tuple[str, str | None]:
        return "u-42", "Alice"

    s = await site(identify=identify)
    async with browser() as b:
        async with b.get(s.url("/gateway/chat.js"), headers={"Sec-Fetch-Site": "cross-site"}) as r:
            settings = loader_settings(await r.text())
            assert "Set-Cookie" not in r.headers
        assert settings["userId"] is None and settings["userName"] is None
        async with b.get(s.url("/gateway/chat.js"), headers={"Sec-Fetch-Site": "same-origin"}) as r:
            settings = loader_settings(await r.text())
        assert (settings["userId"], settings["userName"]) == ("u-42", "Alice")


async def test_hostile_name_in_loader_and_page(site: Factory) -> None:
    @dataclass
    class Who:
        user_id: str
        user_name: str | None

    async def identify(_r: web.BaseRequest) -> Who:
        return Who("u-1", HOSTILE)

    s = await site(identify=identify)
    async with browser() as b:
        async with b.get(s.url("/gateway/chat.js")) as r:
            js = await r.text()
        async with b.get(s.url("/chat/")) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            assert r.headers["Cache-Control"] == "no-store"
            page = await r.text()
    assert HOSTILE not in js and "<img" not in js
    assert loader_settings(js)["userName"] == HOSTILE
    assert HOSTILE not in page and "<img" not in page
    assert "&quot;&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<script") == 1
    assert '<script src="/gateway/chat.js" defer></script>' in page


async def test_page_can_be_turned_off(site: Factory) -> None:
    s = await site(cec=make_cec(page_path=None))
    assert "/chat/" not in s.chat.endpoints()
    async with browser() as b, b.get(s.url("/chat/")) as r:
        assert r.status == 404


async def test_authorization_endpoint_signs_forced_identity(site: Factory) -> None:
    s = await site()
    hostile = {
        "thirdUserName": "  Mallory\x00 ", "thirdUserId": "admin", "tenantSpaceId": "999",
        "channelConfigId": "888", "locale": "zh", "timestamp": 1, "secretKey": "leaked",
    }
    async with browser() as b:
        async with b.post(s.url("/gateway/authorization"), json=hostile) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert r.headers["Cache-Control"] == "no-store"
            signature = await r.text()
            guest_id = GuestCookies(COOKIE_KEY).read_cookie_header(
                r.headers["Set-Cookie"].split(";")[0]
            )
        assert guest_id is not None
        assert independent_verify(signature, name="Mallory", user_id=guest_id)
        assert not independent_verify(signature, name="Mallory", user_id="admin")
        # Same browser, same id; the page's later POST is re-signed the same way.
        async with b.post(s.url("/gateway/authorization"), json=hostile) as r:
            assert "Set-Cookie" not in r.headers
            assert independent_verify(await r.text(), name="Mallory", user_id=guest_id)


async def test_authorization_errors(site: Factory) -> None:
    s = await site()
    async with browser() as b:
        async with b.get(s.url("/gateway/authorization")) as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"
        async with b.post(s.url("/gateway/authorization"), data=b"{nope") as r:
            assert r.status == 400
            assert "not valid JSON" in await r.text()
        async with b.post(s.url("/gateway/authorization"), data=b"[1]") as r:
            assert r.status == 400
        big = json.dumps({"thirdUserName": "x" * 17000}).encode()
        async with b.post(s.url("/gateway/authorization"), data=big) as r:
            assert r.status == 400
            assert "16384" in await r.text()

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b" " * 1000

        async with b.post(s.url("/gateway/authorization"), data=chunks()) as r:
            assert r.status == 400  # chunked, no Content-Length: cut at the limit


async def test_authorization_without_signer_is_404(site: Factory) -> None:
    s = await site(signer=None)
    assert "/gateway/authorization" not in s.chat.endpoints()
    async with browser() as b:
        async with b.post(s.url("/direct/authorization"), json={}) as r:
            assert r.status == 404
        async with b.post(s.url("/gateway/authorization"), json={}) as r:
            assert r.status == 404


async def test_rewrite_through_echo_upstream(site: Factory, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    s = await site()
    page_data = {
        "thirdUserName": "张三 & \"Bob\"", "thirdUserId": "admin", "tenantSpaceId": "999",
        "channelConfigId": "888", "locale": "en", "mapService": "google",
        "timestamp": 1700000000000, "secretKey": SECRET, "thirdPartAuthorization": "forged",
        "thirdUserToken": "page-token",
    }
    caplog.set_level(logging.WARNING, logger="gateway.chat")
    async with browser() as b:
        async with b.post(s.url(NEW_CLIENT + "?&t=1"), json=page_data) as r:
            assert r.status == 200
            assert await r.text() == "/* chat script */"
            set_cookie = r.headers["Set-Cookie"]
        guest_id = GuestCookies(COOKIE_KEY).read_cookie_header(set_cookie.split(";")[0])
        assert guest_id is not None
        hit = s.upstream_hits[-1]
        assert hit["path"] == NEW_CLIENT
        sent = json.loads(hit["body"])
        assert int(hit["content_length"]) == len(hit["body"])
        assert SECRET.encode() not in hit["body"]
        assert "secretKey" not in sent
        assert sent["tenantSpaceId"] == TENANT and sent["channelConfigId"] == CHANNEL
        assert sent["thirdUserId"] == guest_id
        assert sent["thirdUserName"] == '张三 & "Bob"'
        assert sent["locale"] == "en" and sent["mapService"] == "google"
        assert sent["timestamp"] == 1700000000000
        assert "thirdUserToken" not in sent  # authorization mode: the page's token stays here
        assert independent_verify(sent["thirdPartAuthorization"], name='张三 & "Bob"',
                                  user_id=guest_id)
        # Again from the same browser: same id, no new cookie, the warning only once.
        async with b.post(s.url(NEW_CLIENT + "?&t=2"), json=page_data) as r:
            assert "Set-Cookie" not in r.headers
        assert json.loads(s.upstream_hits[-1]["body"])["thirdUserId"] == guest_id
    warnings = [rec for rec in caplog.records if "secretKey" in rec.getMessage()]
    assert len(warnings) == 1
    assert SECRET not in caplog.text
    # Another browser, another guest.
    async with browser() as other, other.post(s.url(NEW_CLIENT), json={}) as r:
        assert r.status == 200
    assert json.loads(s.upstream_hits[-1]["body"])["thirdUserId"] != guest_id


async def test_rewrite_bad_json_forwards_nothing(site: Factory) -> None:
    s = await site()
    async with browser() as b:
        for body in (b"{bad", b"[]", b"x" * 17000):
            async with b.post(s.url(NEW_CLIENT), data=body) as r:
                assert r.status == 400
    assert s.upstream_hits == []


async def test_logged_in_identity_and_tokens(site: Factory) -> None:
    issued: list[tuple[str, str]] = []

    async def identify(request: web.BaseRequest) -> tuple[str, str | None] | None:
        if request.headers.get("Cookie", "").find("session=alice") >= 0:
            return "u-alice", "Alice"
        return None

    async def token_for(user_id: str, user_name: str) -> str:
        issued.append((user_id, user_name))
        return f"tok-{user_id}"

    cec = make_cec(auth=CecAuth(mode="token"))
    s = await site(cec=cec, signer=None, identify=identify, token_for=token_for)
    assert CLIENT in s.chat.rewrite_paths()
    async with aiohttp.ClientSession() as b:
        async with b.post(s.url(CLIENT), json={"thirdUserName": "Eve", "thirdUserToken": "x",
                                               "thirdPartAuthorization": "auth-v2/page/x/y/z"},
                          headers={"Cookie": "session=alice"}) as r:
            assert r.status == 200
            assert "Set-Cookie" not in r.headers
        sent = json.loads(s.upstream_hits[-1]["body"])
        assert (sent["thirdUserId"], sent["thirdUserName"]) == ("u-alice", "Alice")
        assert sent["thirdUserToken"] == "tok-u-alice"
        assert "thirdPartAuthorization" not in sent
        assert issued == [("u-alice", "Alice")]
        # Anonymous in token mode without fallback: 401, nothing forwarded.
        before = len(s.upstream_hits)
        async with b.post(s.url(CLIENT), json={}) as r:
            assert r.status == 401
        assert len(s.upstream_hits) == before
        # The loader for an anonymous visitor carries no identity.
        async with b.get(s.url("/gateway/chat.js")) as r:
            settings = loader_settings(await r.text())
            assert settings["userId"] is None and settings["mode"] == "token"


async def test_token_mode_guest_fallback(site: Factory) -> None:
    issued: list[tuple[str, str]] = []

    async def identify(_r: web.BaseRequest) -> None:
        return None

    async def token_for(user_id: str, user_name: str) -> str:
        issued.append((user_id, user_name))
        return "tok"

    cec = make_cec(auth=CecAuth(mode="token"), identity=CecIdentity(fallback="guest"))
    s = await site(cec=cec, signer=None, identify=identify, token_for=token_for)
    # No valid guest cookie: 307 to the same target with the cookie; nothing minted (so
    # cookie-less floods store nothing), nothing forwarded.
    async with browser() as b, b.post(s.url(CLIENT + "?&t=1"), json={"thirdUserName": "Zed"},
                                      allow_redirects=False) as r:
        assert r.status == 307 and r.headers["Location"] == CLIENT + "?&t=1"
        assert "Set-Cookie" in r.headers and r.headers["Cache-Control"] == "no-store"
    assert issued == [] and s.upstream_hits == []
    # A browser follows it, resending the body with the cookie: one token, then.
    async with browser() as b, b.post(s.url(CLIENT), json={"thirdUserName": " Zed "}) as r:
        assert r.status == 200
        assert [h.status for h in r.history] == [307]
    assert len(s.upstream_hits) == 1
    sent = json.loads(s.upstream_hits[-1]["body"])
    assert GUEST_ID_RE.match(sent["thirdUserId"])
    # The token is bound to exactly the name that is forwarded.
    assert issued == [(sent["thirdUserId"], "Zed")]
    assert sent["thirdUserName"] == "Zed" and sent["thirdUserToken"] == "tok"


async def test_secret_never_served(site: Factory) -> None:
    s = await site()
    seen = bytearray()
    async with browser() as b:
        requests: list[tuple[str, str, Any]] = [
            ("GET", "/gateway/chat.js", None),
            ("HEAD", "/gateway/chat.js", None),
            ("POST", "/gateway/chat.js", None),
            ("GET", "/chat/", None),
            ("POST", "/gateway/authorization", b'{"secretKey": "x"}'),
            ("POST", "/gateway/authorization", b"{bad"),
            ("PUT", "/gateway/authorization", b"{}"),
            ("POST", NEW_CLIENT, json.dumps({"secretKey": SECRET}).encode()),
            ("POST", NEW_CLIENT, b"nope"),
            ("GET", "/nothing", None),
        ]
        for method, path, body in requests:
            async with b.request(method, s.url(path), data=body) as r:
                seen += str(r.status).encode()
                for k, v in r.raw_headers:
                    seen += k + b": " + v + b"\n"
                seen += await r.read()
    assert len(seen) > 1000
    assert SECRET.encode() not in seen
    assert SECRET.lower().encode() not in seen.lower()


async def test_repr_has_no_secret() -> None:
    cec = make_cec()
    chat = ChatEndpoints(cec, signer_from_config(cec), GuestCookies(COOKIE_KEY))
    assert SECRET not in repr(chat)
    assert SECRET not in repr(chat.signer)


def test_signer_from_config_uses_signing_options() -> None:
    from gateway.config import CecSigning

    cec = make_cec(auth=CecAuth(secret_key=SECRET, access_key="ak-1"),
                   signing=CecSigning(signed_headers=["Content-Type"],
                                      payload_fields=["thirdUserId"]))
    signer = signer_from_config(cec)
    assert isinstance(signer, Signer)
    assert signer.access_key == "ak-1"
    assert signer.signed_headers == ("Content-Type",)
    assert signer.payload_fields == ("thirdUserId",)
    assert signer_from_config(make_cec(auth=CecAuth(mode="token"))) is None


async def test_sign_uri_follows_context_path(site: Factory) -> None:
    cec = make_cec(context_path="/cs")
    s = await site(cec=cec)
    assert s.chat.sign_uri == "/cs/webclient/chat_client/js/newThirdPartyClient.js"
    assert s.chat.rewrite_paths() == ["/cs/webclient/chat_client/js/newThirdPartyClient.js"]
    fixed = datetime(2026, 11, 24, 8, 30, 15, 123000, tzinfo=UTC)
    s2 = await site(clock=lambda: fixed)
    async with browser() as b, b.post(s2.url("/gateway/authorization"), json={}) as r:
        assert (await r.text()).startswith(
            "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/"
        )
