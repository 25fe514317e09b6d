"""Identity from the enterprise site (cec.identity.source: url), over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestServer

from gateway.config import CecIdentity, IdentityUrl
from gateway.identity import Identity, UrlIdentity, make_identity
from tests.support.ports import free_port


class Site:
    """A stand-in enterprise site with a "who am I" endpoint keyed by the ``sid`` cookie."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.seen_headers: list[dict[str, str]] = []
        app = web.Application()
        app.router.add_get("/api/me", self.me)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    async def me(self, request: web.Request) -> web.StreamResponse:
        sid = request.cookies.get("sid", "")
        self.calls[sid] += 1
        self.seen_headers.append(dict(request.headers))
        if sid.startswith("good"):
            return web.json_response({"userId": f"u-{sid}", "userName": "Tom 张"})
        if sid == "nested":
            return web.json_response({"data": {"id": 10010001, "name": "Ann"}})
        if sid == "notjson":
            return web.Response(text="<html>hello</html>")
        if sid == "loggedout":
            return web.json_response({"loggedIn": False})
        if sid == "huge":
            return web.json_response({"userId": "u", "userName": "n", "pad": "x" * 100_000})
        if sid == "slow":
            await asyncio.sleep(2)
            return web.json_response({"userId": "late", "userName": "Late"})
        if sid == "error":
            return web.Response(status=500)
        if sid == "redirect":
            raise web.HTTPFound("/login")
        return web.json_response({"error": "not logged in"}, status=401)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/api/me"))


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    s = Site()
    await s.server.start_server()
    yield s
    await s.server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        yield s


class Front:
    """The gateway side: a real server whose handler asks the provider who the caller is."""

    def __init__(self, provider: UrlIdentity) -> None:
        self.provider = provider
        self.server = RawTestServer(self.handle, host="127.0.0.1", port=0)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        who = await self.provider.identify(request)
        return web.json_response(None if who is None else [who.user_id, who.user_name])

    async def ask(self, cookie: str | None, **headers: str) -> Any:
        if cookie is not None:
            headers["Cookie"] = cookie
        # A fresh client per call: each visitor's cookies are exactly what the test sends.
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as c,
            c.get(self.server.make_url("/page"), headers=headers) as r,
        ):
            return json.loads(await r.text())


async def front_for(site: Site, session: aiohttp.ClientSession, **cfg: Any) -> AsyncIterator[Front]:
    provider = UrlIdentity(IdentityUrl(url=site.url, **cfg), session)
    front = Front(provider)
    await front.server.start_server()
    try:
        yield front
    finally:
        await front.server.close()


@pytest.fixture
async def front(site: Site, session: aiohttp.ClientSession) -> AsyncIterator[Front]:
    async for f in front_for(site, session, timeout=0.5):
        yield f


async def test_logged_in_visitor(front: Front, site: Site) -> None:
    assert await front.ask("sid=good1; theme=dark") == ["u-good1", "Tom 张"]
    # Only the visitor's Cookie header went to the site, nothing else the browser sent.
    sent = site.seen_headers[-1]
    assert sent["Cookie"] == "sid=good1; theme=dark"
    assert not {"X-Forwarded-For", "Authorization", "Referer"} & set(sent)


async def test_not_logged_in_is_none(front: Front, site: Site) -> None:
    assert await front.ask("sid=stranger") is None
    assert site.calls["stranger"] == 1


async def test_no_cookie_no_call(front: Front, site: Site) -> None:
    assert await front.ask(None) is None
    assert sum(site.calls.values()) == 0


async def test_browser_headers_are_not_identity(front: Front, site: Site) -> None:
    spoof = {"X-User-Id": "admin", "X-Forwarded-User": "admin", "Authorization": "Bearer admin"}
    assert await front.ask("sid=stranger", **spoof) is None
    assert "X-User-Id" not in site.seen_headers[-1]


async def test_answers_are_cached_per_cookie(front: Front, site: Site) -> None:
    for _ in range(3):
        assert await front.ask("sid=good2") == ["u-good2", "Tom 张"]
        assert await front.ask("sid=stranger") is None
    assert site.calls["good2"] == 1
    assert site.calls["stranger"] == 1
    # A different cookie value is a different visitor.
    assert await front.ask("sid=good3") == ["u-good3", "Tom 张"]
    assert site.calls["good3"] == 1


async def test_cache_expires(site: Site, session: aiohttp.ClientSession) -> None:
    async for front in front_for(site, session, cache_ttl=0.2):
        await front.ask("sid=good4")
        await front.ask("sid=good4")
        assert site.calls["good4"] == 1
        await asyncio.sleep(0.3)
        await front.ask("sid=good4")
        assert site.calls["good4"] == 2


async def test_cache_is_bounded_and_holds_no_cookie(
    site: Site, session: aiohttp.ClientSession
) -> None:
    provider = UrlIdentity(IdentityUrl(url=site.url), session, max_entries=3)
    front = Front(provider)
    await front.server.start_server()
    try:
        for n in range(5):
            await front.ask(f"sid=good-b{n}")
        assert len(provider._cache) == 3
        assert all("sid" not in key and "good" not in key for key in provider._cache)
        await front.ask("sid=good-b0")  # evicted: asked again
        assert site.calls["good-b0"] == 2
    finally:
        await front.server.close()


async def test_concurrent_lookups_share_one_call(front: Front, site: Site) -> None:
    answers = await asyncio.gather(*(front.ask("sid=good5") for _ in range(10)))
    assert all(a == ["u-good5", "Tom 张"] for a in answers)
    assert site.calls["good5"] == 1


@pytest.mark.parametrize("sid", ["notjson", "error", "redirect", "loggedout", "huge"])
async def test_unusable_answers_are_none(front: Front, sid: str) -> None:
    assert await front.ask(f"sid={sid}") is None


async def test_site_errors_are_not_cached(front: Front, site: Site) -> None:
    await front.ask("sid=error")
    await front.ask("sid=error")
    assert site.calls["error"] == 2
    await front.ask("sid=redirect")
    await front.ask("sid=redirect")
    assert site.calls["redirect"] == 1  # a redirect to a login page is a definite answer


async def test_timeout_is_none_and_quick(front: Front) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await front.ask("sid=slow") is None
    assert loop.time() - started < 1.5


async def test_site_down_is_none(session: aiohttp.ClientSession) -> None:
    port = free_port()
    provider = UrlIdentity(IdentityUrl(url=f"http://127.0.0.1:{port}/api/me"), session)
    front = Front(provider)
    await front.server.start_server()
    try:
        assert await front.ask("sid=good") is None
    finally:
        await front.server.close()


async def test_configured_field_names_and_dotted_paths(
    site: Site, session: aiohttp.ClientSession
) -> None:
    async for front in front_for(
        site, session, user_id_field="data.id", user_name_field="data.name"
    ):
        assert await front.ask("sid=nested") == ["10010001", "Ann"]
        # Fields absent under these names: not logged in.
        assert await front.ask("sid=good6") is None


async def test_make_identity(session: aiohttp.ClientSession) -> None:
    assert make_identity(CecIdentity(source="guest"), session) is None
    provider = make_identity(
        CecIdentity(source="url", url=IdentityUrl(url="http://127.0.0.1:1/me")), session
    )
    assert isinstance(provider, UrlIdentity)
    assert Identity("u", "n") == Identity("u", "n")
