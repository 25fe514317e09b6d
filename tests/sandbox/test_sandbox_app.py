"""The sandbox over real sockets: auth modes, the cookie, the widget and agent WebSockets."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.sandbox.app import (
    COOKIE_NAME,
    HUB_KEY,
    _js_literal,
    cookie_domain,
    create_sandbox_app,
    run_sandbox,
    runner_url,
    start_sandbox,
)
from gateway.sandbox.settings import SandboxSettings
from tests.support.sandbox import CHANNEL, NEW_CLIENT_PATH, SECRET, TENANT, settings, signed_body

Factory = Callable[..., Awaitable[TestServer]]
CP = "/service-cloud"
THIRD_CLIENT_PATH = f"{CP}/webclient/chat_client/js/thirdPartyClient.js"
EVIL = '"</script><img src=x onerror=alert(1)>'


@pytest.fixture
async def sandbox(aiohttp_server: Factory) -> Callable[..., Awaitable[TestServer]]:
    async def start(**overrides: Any) -> TestServer:
        clock = overrides.pop("clock", time.time)
        wall_clock = overrides.pop("wall_clock", None)
        app = create_sandbox_app(settings(**overrides), clock=clock, wall_clock=wall_clock)
        return await aiohttp_server(app)

    return start


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe=True: the sandbox's cookie names an IP address as its Domain.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


def set_cookies(resp: aiohttp.ClientResponse) -> list[str]:
    return resp.headers.getall("Set-Cookie", [])


async def login_visitor(browser: aiohttp.ClientSession, server: TestServer,
                        **body_kw: Any) -> aiohttp.ClientResponse:
    body = signed_body(**body_kw)
    async with browser.post(server.make_url(NEW_CLIENT_PATH + "?&t=1"),
                            data=json.dumps(body, ensure_ascii=False)) as resp:
        await resp.read()
        return resp


async def next_event(ws: aiohttp.ClientWebSocketResponse,
                     pred: Callable[[dict[str, Any]], bool] = lambda e: True,
                     limit: float = 1.5) -> dict[str, Any]:
    async with asyncio.timeout(limit):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            event: dict[str, Any] = json.loads(msg.data)
            if pred(event):
                return event


async def agent_socket(browser: aiohttp.ClientSession, server: TestServer,
                       idle: bool = True) -> aiohttp.ClientWebSocketResponse:
    ws = await browser.ws_connect(server.make_url(f"{CP}/agent/ws"))
    await ws.send_json({"type": "login", "id": "agent1", "password": "agent1"})
    welcome = await next_event(ws)
    assert welcome["type"] == "welcome" and welcome["agent"]["id"] == "agent1"
    if idle:
        await ws.send_json({"type": "status", "status": "idle"})
        assert (await next_event(ws, lambda e: e["type"] == "status"))["status"] == "idle"
    return ws


# ---------------------------------------------------------------- authorization mode


async def test_authorization_mode_sets_cookie_and_returns_widget(
        sandbox: Factory, browser: aiohttp.ClientSession) -> None:
    server = await sandbox()
    resp = await login_visitor(browser, server)
    assert resp.status == 200
    assert resp.content_type == "text/javascript"
    text = await resp.text()
    assert "/webclient/chat_client/widget/widget.js" in text and "$ContextPath" in text
    (raw,) = set_cookies(resp)
    cookie = SimpleCookie()
    cookie.load(raw)
    morsel = cookie[COOKIE_NAME]
    assert len(morsel.value) >= 40
    assert morsel["domain"] == "127.0.0.1"  # its own host, without the port
    assert morsel["path"] == CP
    assert morsel["httponly"] is True
    assert "secure" not in raw.lower()  # plain HTTP here
    assert SECRET not in text and SECRET not in raw


async def test_cookie_domain_follows_host_header(sandbox: Factory,
                                                 browser: aiohttp.ClientSession) -> None:
    server = await sandbox()
    async with browser.post(server.make_url(NEW_CLIENT_PATH), json=signed_body(),
                            headers={"Host": "cec.example.test:8443"}) as resp:
        assert resp.status == 200
        assert "Domain=cec.example.test;" in set_cookies(resp)[0] + ";"


def test_cookie_domain_helper() -> None:
    assert cookie_domain("cec.example.test:8443") == "cec.example.test"
    assert cookie_domain("127.0.0.1") == "127.0.0.1"
    assert cookie_domain("[::1]:8090") is None


@pytest.mark.parametrize("case", ["wrong_secret", "stale", "future", "tampered",
                                  "wrong_tenant", "wrong_channel", "no_credentials",
                                  "not_json", "wrong_path"])
async def test_authorization_refused(sandbox: Factory, browser: aiohttp.ClientSession,
                                     case: str) -> None:
    server = await sandbox()
    body: Any = signed_body()
    if case == "wrong_secret":
        body = signed_body(secret="x" * 43)
    elif case == "stale":
        body = signed_body(now=time.time() - 301)
    elif case == "future":
        body = signed_body(now=time.time() + 301)
    elif case == "tampered":
        body["thirdUserId"] = "someone-else"
    elif case == "wrong_tenant":
        body["tenantSpaceId"] = "1"
    elif case == "wrong_channel":
        body["channelConfigId"] = "1"
    elif case == "no_credentials":
        del body["thirdPartAuthorization"]
    elif case == "wrong_path":
        body = signed_body(path="/service-cloud/other.js")
    data = "{not json" if case == "not_json" else json.dumps(body)
    async with browser.post(server.make_url(NEW_CLIENT_PATH), data=data) as resp:
        assert resp.status == 401
        assert await resp.text() == "/* unauthorized */\n"
        assert resp.content_type == "text/javascript"
        assert not set_cookies(resp)


async def test_replay_refused(sandbox: Factory, browser: aiohttp.ClientSession) -> None:
    server = await sandbox()
    body = signed_body()
    async with browser.post(server.make_url(NEW_CLIENT_PATH), json=body) as first:
        assert first.status == 200
    async with browser.post(server.make_url(NEW_CLIENT_PATH), json=body) as second:
        assert second.status == 401
        assert not set_cookies(second)


async def test_frozen_clock_accepts_spec_vector(sandbox: Factory,
                                                browser: aiohttp.ClientSession) -> None:
    vector_time = dt.datetime(2026, 11, 24, 8, 30, 15, 123000, tzinfo=dt.UTC).timestamp()
    server = await sandbox(clock=lambda: vector_time)
    body = {"thirdUserName": "Tom", "thirdUserId": "10010001", "tenantSpaceId": TENANT,
            "channelConfigId": CHANNEL, "locale": "zh", "timestamp": 1,
            "thirdPartAuthorization":
                "auth-v2/202011230001/2026-11-24T08:30:15.123Z/content-length;content-type/"
                "bb22f7612ab6d3a91f2eb4011042ba86d7dc98bb29b6c6569004093e01f75c13"}
    async with browser.post(server.make_url(NEW_CLIENT_PATH + "?&t=5"), json=body) as resp:
        assert resp.status == 200


async def test_no_secret_refuses_authorization_mode(aiohttp_server: Factory,
                                                    browser: aiohttp.ClientSession) -> None:
    server = await aiohttp_server(create_sandbox_app(SandboxSettings()))
    async with browser.post(server.make_url(NEW_CLIENT_PATH), json=signed_body()) as resp:
        assert resp.status == 401


# ---------------------------------------------------------------- token mode


class Validator:
    """A tiny enterprise validation endpoint that records what the CEC sent."""

    def __init__(self, answer: Any, status: int = 200) -> None:
        self.answer = answer
        self.status = status
        self.seen: list[Any] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(await request.json())
        if isinstance(self.answer, str):
            return web.Response(text=self.answer, status=self.status)
        return web.json_response(self.answer, status=self.status)


async def start_validator(aiohttp_server: Factory, validator: Validator) -> str:
    app = web.Application()
    app.router.add_post("/rest/cc-messaging/v1/thirdparty/chatThirdPartyValidate",
                        validator.handle)
    server = await aiohttp_server(app)
    return str(server.make_url("/rest/cc-messaging/v1/thirdparty/chatThirdPartyValidate"))


def token_body(token: str = "tok-123", name: str = "Tom") -> dict[str, Any]:
    return {"thirdUserToken": token, "thirdUserName": name, "thirdUserId": "u-42",
            "tenantSpaceId": TENANT, "channelConfigId": CHANNEL, "locale": "zh",
            "mapService": "tencent", "timestamp": 1}


async def test_token_mode_accepted_with_retcode_zero(
        sandbox: Factory, aiohttp_server: Factory, browser: aiohttp.ClientSession) -> None:
    validator = Validator({"retCode": 0, "message": "validate success"})
    server = await sandbox(validate_url=await start_validator(aiohttp_server, validator))
    async with browser.post(server.make_url(NEW_CLIENT_PATH), json=token_body()) as resp:
        assert resp.status == 200
        assert COOKIE_NAME in set_cookies(resp)[0]
    assert validator.seen == [{"Token": "tok-123", "userName": "Tom", "userId": "u-42",
                               "tenantSpaceId": TENANT}]


@pytest.mark.parametrize(("answer", "status"), [
    ({"retCode": 1, "message": "bad token"}, 200),
    ({"retCode": "-1"}, 200),
    ({"message": "no code"}, 200),
    ({"retCode": 0}, 500),
    ("not json", 200),
])
async def test_token_mode_refused(sandbox: Factory, aiohttp_server: Factory,
                                  browser: aiohttp.ClientSession, answer: Any,
                                  status: int) -> None:
    validator = Validator(answer, status)
    server = await sandbox(validate_url=await start_validator(aiohttp_server, validator))
    async with browser.post(server.make_url(NEW_CLIENT_PATH), json=token_body()) as resp:
        assert resp.status == 401
        assert await resp.text() == "/* unauthorized */\n"
        assert not set_cookies(resp)
    assert len(validator.seen) == 1


async def test_token_mode_validation_unreachable(sandbox: Factory,
                                                 browser: aiohttp.ClientSession) -> None:
    probe = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    server = await sandbox(validate_url=f"http://127.0.0.1:{port}/validate",
                           validate_timeout=0.5)
    async with browser.post(server.make_url(NEW_CLIENT_PATH), json=token_body()) as resp:
        assert resp.status == 401


async def test_token_mode_validation_timeout(sandbox: Factory, aiohttp_server: Factory,
                                             browser: aiohttp.ClientSession) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({"retCode": 0})

    app = web.Application()
    app.router.add_post("/v", slow)
    slow_server = await aiohttp_server(app)
    server = await sandbox(validate_url=str(slow_server.make_url("/v")), validate_timeout=0.2)
    started = time.monotonic()
    async with browser.post(server.make_url(NEW_CLIENT_PATH), json=token_body()) as resp:
        assert resp.status == 401
    assert time.monotonic() - started < 1.5


async def test_third_party_client_js_continues_with_third_validate(
        sandbox: Factory, browser: aiohttp.ClientSession) -> None:
    server = await sandbox()
    async with browser.post(server.make_url(THIRD_CLIENT_PATH + "?&t=1"),
                            data=json.dumps(token_body())) as resp:
        assert resp.status == 200
        text = await resp.text()
        assert "thirdValidate(data)" in text
        for name in ("token", "userName", "userId", "tenantSpaceId", "configId", "locale"):
            assert f"typeof {name} " in text
    async with browser.post(server.make_url(THIRD_CLIENT_PATH),
                            json={**token_body(), "channelConfigId": "x"}) as resp:
        assert resp.status == 401


# ---------------------------------------------------------------- static pieces


@pytest.mark.parametrize(("path", "ctype", "needle"), [
    (f"{CP}/resource.root/cobrowse/sdk/cobrowse.js", "text/javascript", "co-browsing"),
    (f"{CP}/webclient/chat_client/js/cobrowseCommon.js", "text/javascript", "co-browsing"),
    (f"{CP}/webclient/chat_client/widget/widget.js", "text/javascript", "cec-chat-button"),
    (f"{CP}/webclient/chat_client/widget/widget.css", "text/css", "#cec-chat-window"),
    (f"{CP}/agent/", "text/html", "agent-login-form"),
    (f"{CP}/agent/agent.js", "text/javascript", "agent-chat-list"),
    (f"{CP}/agent/agent.css", "text/css", ".agent-chat"),
    (f"{CP}/health", "text/plain", "ok"),
])
async def test_static_and_stubs(sandbox: Factory, browser: aiohttp.ClientSession, path: str,
                                ctype: str, needle: str) -> None:
    server = await sandbox()
    async with browser.get(server.make_url(path)) as resp:
        assert resp.status == 200
        assert resp.content_type == ctype
        assert needle in await resp.text()


async def test_console_has_csp_and_redirect(sandbox: Factory,
                                            browser: aiohttp.ClientSession) -> None:
    server = await sandbox()
    async with browser.get(server.make_url(f"{CP}/agent/")) as resp:
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    async with browser.get(server.make_url(f"{CP}/agent"), allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == f"{CP}/agent/"


def test_widget_sources_never_use_inner_html() -> None:
    from importlib.resources import files

    static = files("gateway.sandbox").joinpath("static")
    for name in ("widget.js", "agent.js"):
        source = static.joinpath(name).read_text(encoding="utf-8")
        code = "\n".join(line for line in source.splitlines()
                         if not line.lstrip().startswith(("/*", "*")))
        assert "innerHTML" not in code and "insertAdjacentHTML" not in code
        assert "document.write" not in code


def test_js_literal_escapes_script_breakers() -> None:
    text = _js_literal({"name": EVIL, "x": "\u2028&"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text)["name"] == EVIL


# ---------------------------------------------------------------- websockets


async def test_widget_socket_without_cookie_is_closed_4401(
        sandbox: Factory, browser: aiohttp.ClientSession) -> None:
    server = await sandbox()
    ws = await browser.ws_connect(server.make_url(f"{CP}/webclient/ws"))
    msg = await ws.receive(timeout=1.0)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401
    await ws.close()


async def test_agent_wrong_password(sandbox: Factory, browser: aiohttp.ClientSession) -> None:
    server = await sandbox()
    async with browser.ws_connect(server.make_url(f"{CP}/agent/ws")) as ws:
        await ws.send_json({"type": "status", "status": "idle"})
        assert (await next_event(ws))["type"] == "error"
        await ws.send_json({"type": "login", "id": "agent1", "password": "nope"})
        assert (await next_event(ws))["type"] == "login_failed"
        await ws.send_json({"type": "login", "id": "agent1", "password": "agent1"})
        assert (await next_event(ws))["type"] == "welcome"


async def test_visitor_agent_conversation_and_rating(
        sandbox: Factory, browser: aiohttp.ClientSession) -> None:
    server = await sandbox()
    agent = await agent_socket(browser, server)
    resp = await login_visitor(browser, server, name=EVIL, user_id="guest-1")
    assert resp.status == 200
    visitor = await browser.ws_connect(server.make_url(f"{CP}/webclient/ws"))
    hello = await next_event(visitor)
    assert hello["type"] == "hello" and hello["visitor"]["name"] == EVIL
    assert hello["chat"]["state"] == "active"

    chat = (await next_event(agent, lambda e: e["type"] == "chat"))["chat"]
    assert chat["visitor"] == {"id": "guest-1", "name": EVIL}

    await visitor.send_json({"type": "message", "text": "hello from the visitor"})
    got = await next_event(agent, lambda e: e["type"] == "message" and e["from"] == "visitor")
    assert got["text"] == "hello from the visitor" and got["chat"] == chat["id"]

    await agent.send_json({"type": "message", "chat": chat["id"], "text": "hello, agent here"})
    reply = await next_event(visitor, lambda e: e["type"] == "message" and e["from"] == "agent")
    assert reply["text"] == "hello, agent here" and reply["name"] == "Agent One"

    for stars, comment in ((3, "ok"), (5, "great, thanks")):
        await visitor.send_json({"type": "rate", "stars": stars, "comment": comment})
        rating = await next_event(agent, lambda e: e["type"] == "rating")
        assert (rating["stars"], rating["comment"]) == (stars, comment)
        ack = await next_event(visitor, lambda e: e["type"] == "rating")
        assert ack["stars"] == stars
    hub = server.app[HUB_KEY]
    known = hub.lookup_visitor(
        browser.cookie_jar.filter_cookies(server.make_url(CP + "/"))[COOKIE_NAME].value)
    assert known is not None
    session = hub.current_session(known)
    assert session is not None and session.rating is not None
    assert (session.rating.stars, session.rating.comment) == (5, "great, thanks")

    await visitor.send_json({"type": "rate", "stars": 9})
    assert (await next_event(visitor, lambda e: e["type"] == "error"))["message"]

    await visitor.send_json({"type": "end"})
    ended = await next_event(agent, lambda e: e["type"] == "ended")
    assert ended == {"type": "ended", "chat": chat["id"], "reason": "visitor"}
    await visitor.close()
    await agent.close()


async def test_visitor_reconnect_gets_history(sandbox: Factory,
                                              browser: aiohttp.ClientSession) -> None:
    server = await sandbox()
    agent = await agent_socket(browser, server)
    await login_visitor(browser, server)
    url = server.make_url(f"{CP}/webclient/ws")
    async with browser.ws_connect(url) as first:
        await next_event(first)
        await first.send_json({"type": "message", "text": "before the drop"})
        await next_event(agent, lambda e: e["type"] == "message" and e["from"] == "visitor")
    async with browser.ws_connect(url) as second:
        hello = await next_event(second)
        assert hello["chat"]["state"] == "active"
        assert "before the drop" in [m["text"] for m in hello["chat"]["messages"]]
    await agent.close()


async def test_queue_reminder_over_websocket(sandbox: Factory,
                                             browser: aiohttp.ClientSession) -> None:
    server = await sandbox(queue_reminder_interval=0.05, queue_no_agent_text="hold on {position}")
    await login_visitor(browser, server)
    async with browser.ws_connect(server.make_url(f"{CP}/webclient/ws")) as ws:
        for _ in range(3):
            event = await next_event(ws, lambda e: e["type"] == "message")
            assert event["text"] == "hold on 1" and event["from"] == "system"
        agent = await agent_socket(browser, server)
        await next_event(ws, lambda e: e["type"] == "state" and e["state"] == "active")
        await agent.close()


async def test_robot_handover_over_websocket(sandbox: Factory,
                                             browser: aiohttp.ClientSession) -> None:
    server = await sandbox(robot={"enabled": True, "default_reply": "robot says what?"})
    agent = await agent_socket(browser, server)
    await login_visitor(browser, server)
    async with browser.ws_connect(server.make_url(f"{CP}/webclient/ws")) as ws:
        hello = await next_event(ws)
        assert hello["chat"]["state"] == "robot"
        await ws.send_json({"type": "message", "text": "hi"})
        reply = await next_event(ws, lambda e: e["type"] == "message" and e["from"] == "robot")
        assert reply["text"] == "robot says what?"
        await ws.send_json({"type": "message", "text": "转人工"})
        await next_event(ws, lambda e: e["type"] == "state" and e["state"] == "active")
        assert (await next_event(agent, lambda e: e["type"] == "chat"))["chat"]["state"] == \
            "active"
    await agent.close()


async def test_off_hours_over_websocket(sandbox: Factory,
                                        browser: aiohttp.ClientSession) -> None:
    server = await sandbox(
        working_hours={"workday_periods": [{"start": "09:00", "end": "10:00"}],
                       "other_day_periods": [{"start": "09:00", "end": "10:00"}]},
        off_hours_message="closed now",
        wall_clock=lambda: dt.datetime(2026, 11, 24, 23, 0, tzinfo=dt.UTC))
    await login_visitor(browser, server)
    async with browser.ws_connect(server.make_url(f"{CP}/webclient/ws")) as ws:
        chat = (await next_event(ws))["chat"]
        assert chat["state"] == "ended" and chat["endReason"] == "off_hours"
        assert [m["text"] for m in chat["messages"]] == ["closed now"]


async def test_idle_session_ends_over_websocket(sandbox: Factory,
                                                browser: aiohttp.ClientSession) -> None:
    server = await sandbox(session_timeout=0.15, session_end_message="idle bye")
    agent = await agent_socket(browser, server)
    await login_visitor(browser, server)
    async with browser.ws_connect(server.make_url(f"{CP}/webclient/ws")) as ws:
        ended = await next_event(ws, lambda e: e["type"] == "state" and e["state"] == "ended")
        assert ended["reason"] == "timeout"
        assert (await next_event(agent, lambda e: e["type"] == "ended"))["reason"] == "timeout"
    await agent.close()


# ---------------------------------------------------------------- lifecycle


async def test_start_and_cleanup_with_open_sockets() -> None:
    s = settings()
    runner = await start_sandbox(s, port=0)
    url = runner_url(runner, s)
    assert url.startswith("http://127.0.0.1:") and url.endswith(CP)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        ws = await session.ws_connect(url + "/agent/ws")
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 2.0
        msg = await ws.receive(timeout=1.0)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_run_sandbox_serves_until_cancelled() -> None:
    s = settings(port=0)
    task = asyncio.create_task(run_sandbox(s))
    await asyncio.sleep(0.2)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------- visitors who left


async def test_a_visitor_socket_without_heartbeat_frees_the_agent(
        sandbox: Factory, browser: aiohttp.ClientSession) -> None:
    """A page that is gone without closing (no pong to the heartbeat) ends its chat."""
    server = await sandbox(visitor_heartbeat=0.2, visitor_gone_timeout=0.1)
    agent = await agent_socket(browser, server)
    await login_visitor(browser, server)
    # autoping=False: this client never answers the server's pings, like a dead tab.
    ws = await browser.ws_connect(server.make_url(f"{CP}/webclient/ws"), autoping=False)
    hello = await next_event(ws)
    chat = hello["chat"]["id"]
    assert hello["chat"]["state"] == "active"
    ended = await next_event(agent, lambda e: e["type"] == "ended", limit=5)
    assert ended == {"type": "ended", "chat": chat, "reason": "visitor_left"}
    await ws.close()
    await agent.close()


async def test_the_pagehide_beacon_closes_that_page_only(
        sandbox: Factory, browser: aiohttp.ClientSession) -> None:
    server = await sandbox(visitor_gone_timeout=0.1)
    hub = server.app[HUB_KEY]
    agent = await agent_socket(browser, server)
    await login_visitor(browser, server)
    ws = await browser.ws_connect(server.make_url(f"{CP}/webclient/ws"))
    hello = await next_event(ws)
    connection = (await next_event(ws, lambda e: e["type"] == "connection"))["id"]
    assert isinstance(connection, str) and len(connection) >= 20
    leave = server.make_url(f"{CP}/webclient/leave")
    # Another site's page can make the browser POST with the cookie, but cannot know the id;
    # without the cookie, the id alone is not enough either.
    async with browser.post(leave, data=json.dumps({"connection": "guess"})) as r:
        assert r.status == 204
    async with aiohttp.ClientSession() as stranger, stranger.post(
            leave, data=json.dumps({"connection": connection})) as r:
        assert r.status == 204
    async with browser.post(leave, data=b"\xff not json") as r:
        assert r.status == 204
    assert not ws.closed and not hub.awaiting_return(hub.agent("agent1").chats[
        hello["chat"]["id"]].visitor)
    # The page's own beacon: its connection closes at once, the chat ends after the timeout.
    async with browser.post(leave, data=json.dumps({"connection": connection})) as r:
        assert r.status == 204
    msg = await ws.receive(timeout=2)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    ended = await next_event(agent, lambda e: e["type"] == "ended", limit=3)
    assert ended["reason"] == "visitor_left" and ended["chat"] == hello["chat"]["id"]
    await agent.close()
