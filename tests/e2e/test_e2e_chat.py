"""The whole chat in headless Chromium: site → gateway → sandbox, visitor and agent.

For both auth modes: the widget appears on the site through the gateway without console errors,
``ccmessaging-token`` lands on the gateway's origin, a message goes from visitor to agent and a
reply back, the rating reaches the agent, a hostile display name stays text, and no response
the browser received holds a secret. The page copied from the vendor's guide works too. Then
the sandbox's refusals (signature, timestamp, replay, token) at the HTTP level, and CORS.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from gateway.signing import Signer
from tests.e2e.conftest import (
    CHANNEL,
    SCREENSHOTS_ENV,
    TENANT,
    XSS_NAME,
    Stack,
    run_stack,
)

expect = pytest.importorskip("playwright.async_api").expect

CLIENT_PATH = "/service-cloud/webclient/chat_client/js/newThirdPartyClient.js"


# ---------------------------------------------------------------- page helpers


async def agent_sign_in(page: Any, stack: Stack) -> None:
    await page.goto(stack.agent_console)
    await page.fill("#agent-id", "agent1")
    await page.fill("#agent-password", "agent1")
    await page.click("#agent-login-submit")
    idle = page.locator("#agent-status-idle")
    await expect(idle).to_be_visible()
    await expect(page.locator("#agent-status")).to_have_attribute("data-status", "rest")
    await idle.click()
    await expect(page.locator("#agent-status")).to_have_attribute("data-status", "idle")


async def open_widget(page: Any) -> None:
    await expect(page.locator("#cec-widget #cec-chat-button")).to_be_visible()
    await page.click("#cec-chat-button")
    window = page.locator("#cec-chat-window")
    await expect(window).to_be_visible()
    await expect(window).to_have_attribute("data-connected", "true")
    await expect(window).to_have_attribute("data-state", "active")


async def exchange(visitor: Any, agent: Any, text: str, reply: str) -> None:
    """The visitor writes ``text``; the agent sees it and answers ``reply``; the visitor sees it."""
    await visitor.fill("#cec-chat-input", text)
    await visitor.click("#cec-chat-send")
    await expect(visitor.locator("#cec-chat-messages .cec-msg-visitor .cec-msg-text").last
                 ).to_have_text(text)
    await expect(agent.locator("#agent-messages .agent-msg-visitor").last).to_contain_text(text)
    await agent.fill("#agent-input", reply)
    await agent.click("#agent-send")
    await expect(visitor.locator("#cec-chat-messages .cec-msg-agent .cec-msg-text").last
                 ).to_have_text(reply)


async def rate(visitor: Any, agent: Any, stars: int, comment: str) -> None:
    if await visitor.locator("#cec-rating").is_hidden():  # the button toggles the panel
        await visitor.click("#cec-chat-rate")
    await visitor.click(f'button.cec-star[data-star="{stars}"]')
    await visitor.fill("#cec-rating-comment", comment)
    await visitor.click("#cec-rating-submit")
    await expect(agent.locator("#agent-rating")).to_have_attribute("data-stars", str(stars))
    await expect(agent.locator("#agent-rating-comment")).to_have_text(comment)


async def assert_gateway_cookie(context: Any, stack: Stack) -> None:
    """``ccmessaging-token`` is host-only on the gateway's host, under the chat's path.

    The sandbox sets ``Domain=127.0.0.1``; the browser talks to ``localhost``. Without the
    gateway's rewriting the browser refuses the cookie, and this finds none.
    """
    cookies = await context.cookies()
    tokens = [c for c in cookies if c["name"] == "ccmessaging-token"]
    assert len(tokens) == 1, cookies
    cookie = tokens[0]
    assert cookie["domain"] == "localhost"  # no leading dot: no Domain attribute survived
    assert cookie["path"] == "/service-cloud"
    assert cookie["httpOnly"] is True
    assert not [c for c in cookies if c["domain"].lstrip(".") == "127.0.0.1"]


async def assert_inert(page: Any) -> None:
    """No alert ran and no <img> was ever created from the hostile name."""
    assert await page.evaluate("window.__alerts") == []
    assert await page.evaluate("window.__imgs") == 0
    assert await page.evaluate("document.querySelectorAll('img').length") == 0


def assert_quiet(*watches: Any) -> None:
    for w in watches:
        assert w.console_errors == [], w.console_errors
        assert w.page_errors == [], w.page_errors


# ---------------------------------------------------------------- the flows


async def test_authorization_mode_in_chromium(open_page: Any, tmp_path: Path) -> None:
    async with run_stack("authorization") as stack:
        agent_ctx, agent, agent_watch = await open_page()
        await agent_sign_in(agent, stack)

        # A guest on the site's home page, through the gateway.
        ctx, visitor, watch = await open_page()
        await visitor.goto(stack.gateway + "/")
        await open_widget(visitor)
        await assert_gateway_cookie(ctx, stack)
        await expect(visitor.locator("#cec-chat-visitor-name")).to_have_text(
            # Guests get "Guest-<6 hex>" from the gateway.
            re.compile(r"^Guest-[0-9a-f]{6}$"))
        await exchange(visitor, agent, "Hello, I need help with my order.",
                       "Sure! What is the order number?")
        await rate(visitor, agent, 4, "Quick and friendly")
        shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
        await visitor.screenshot(path=str(shots / "widget.png"))
        await agent.screenshot(path=str(shots / "agent-console.png"))
        assert (shots / "widget.png").stat().st_size > 0

        # The vendor guide's page, with a hostile display name in thirdUserName.
        ctx2, guide, guide_watch = await open_page()
        await guide.goto(f"{stack.gateway}/guide-demo.html?name={quote(XSS_NAME)}")
        await open_widget(guide)
        await assert_gateway_cookie(ctx2, stack)
        await expect(guide.locator("#cec-chat-visitor-name")).to_have_text(XSS_NAME)
        await agent.locator("#agent-chat-list li.agent-chat-item").filter(
            has_text=XSS_NAME).click()
        await expect(agent.locator("#agent-chat-visitor")).to_have_text(XSS_NAME)
        await exchange(guide, agent, "Hi from the guide page", "Hello, guide page visitor")
        await expect(guide.locator("#cec-chat-messages .cec-msg-visitor .cec-msg-name").last
                     ).to_have_text(XSS_NAME)

        for page in (visitor, guide, agent):
            await assert_inert(page)
        assert_quiet(watch, guide_watch, agent_watch)
        for w in (watch, guide_watch, agent_watch):
            await w.assert_no_secret(*stack.secrets.values())
        for c in (ctx, ctx2, agent_ctx):
            await c.close()


async def test_token_mode_in_chromium(open_page: Any) -> None:
    async with run_stack("token") as stack:
        agent_ctx, agent, agent_watch = await open_page()
        await agent_sign_in(agent, stack)

        # The site's fake login, with a hostile name; the gateway learns it from /api/me.
        ctx, visitor, watch = await open_page()
        await visitor.goto(stack.gateway + "/login")
        await visitor.fill("#site-login-name", XSS_NAME)
        await visitor.click("#site-login-submit")
        await expect(visitor.locator("#site-user")).to_have_text("Signed in as " + XSS_NAME)
        await open_widget(visitor)
        await assert_gateway_cookie(ctx, stack)
        await expect(visitor.locator("#cec-chat-visitor-name")).to_have_text(XSS_NAME)
        await expect(agent.locator("#agent-chat-visitor")).to_have_text(XSS_NAME)
        await exchange(visitor, agent, "Where is my parcel?", "It ships tomorrow.")
        await rate(visitor, agent, 5, "Great")
        # Last rating wins.
        await rate(visitor, agent, 3, "Actually, just fine")

        for page in (visitor, agent):
            await assert_inert(page)
        assert_quiet(watch, agent_watch)
        for w in (watch, agent_watch):
            await w.assert_no_secret(*stack.secrets.values())
        for c in (ctx, agent_ctx):
            await c.close()


# ---------------------------------------------------------------- CORS


FETCH = """async ([url, preflight]) => {
  try {
    const init = { credentials: "include" };
    if (preflight) { init.headers = { "Content-Type": "application/json" }; }
    const r = await fetch(url, init);
    return r.status + ":" + await r.text();
  } catch (e) {
    return "error:" + e;
  }
}"""


async def test_cors_allowed_and_denied_origins(open_page: Any) -> None:
    async with run_stack("authorization") as stack:
        url = stack.gateway + "/api/status"
        _ctx, page, watch = await open_page()
        await page.goto(stack.allowed_origin + "/")
        for preflight in (False, True):
            result = await page.evaluate(FETCH, [url, preflight])
            assert result.startswith("200:"), result
            assert json.loads(result[4:])["site"] == "Example Corp"

        await page.goto(stack.denied_origin + "/")
        for preflight in (False, True):
            result = await page.evaluate(FETCH, [url, preflight])
            assert result.startswith("error:"), result
        # The browser says why (and this shows the console hook the other tests rely on works).
        assert any("CORS policy" in e for e in watch.console_errors), watch.console_errors


# ---------------------------------------------------------------- the sandbox's refusals


def _third_user_data(user_id: str = "10010001") -> dict[str, Any]:
    return {"thirdUserName": "Tom", "thirdUserId": user_id, "tenantSpaceId": TENANT,
            "channelConfigId": CHANNEL, "locale": "en", "mapService": "tencent",
            "timestamp": 1}


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with session.post(url, data=json.dumps(body, ensure_ascii=False).encode(),
                            headers={"Content-Type": "application/json;charset=UTF-8"}) as r:
        await r.read()
        return r.status


async def test_sandbox_refuses_bad_signature_stale_timestamp_and_replay() -> None:
    async with run_stack("authorization") as stack, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        url = f"http://127.0.0.1:{stack.sandbox_port}{CLIENT_PATH}"
        signer = Signer(CHANNEL, stack.secrets["CEC_SECRET_KEY"])
        now = datetime.now(UTC)

        def signed(body: dict[str, Any], signer: Signer = signer,
                   when: datetime = now) -> dict[str, Any]:
            out = dict(body)
            out["thirdPartAuthorization"] = signer.sign_fields(
                body, timestamp=signer.timestamp(when), uri=CLIENT_PATH)
            return out

        good = signed(_third_user_data())
        async with http.post(url, data=json.dumps(good).encode(),
                             headers={"Content-Type": "application/json;charset=UTF-8"}) as r:
            assert r.status == 200
            cookie = r.headers.get("Set-Cookie", "")
            assert cookie.startswith("ccmessaging-token=")
            assert "Domain=127.0.0.1" in cookie and "Path=/service-cloud" in cookie
        assert await _post(http, url, good) == 401  # the same signature again: a replay

        other = Signer(CHANNEL, "x" * 43)
        assert await _post(http, url, signed(_third_user_data("u2"), signer=other)) == 401
        stale = now - timedelta(minutes=10)
        assert await _post(http, url, signed(_third_user_data("u3"), when=stale)) == 401
        tampered = signed(_third_user_data("u4"))
        tampered["thirdUserId"] = "someone-else"
        assert await _post(http, url, tampered) == 401
        # A fresh, correct one still passes: the refusals above were about the signature.
        assert await _post(http, url, signed(_third_user_data("u5"))) == 200


async def test_token_mode_refuses_a_wrong_token() -> None:
    async with run_stack("token") as stack, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        url = f"http://127.0.0.1:{stack.sandbox_port}{CLIENT_PATH}"
        body = {**_third_user_data("user-42"), "thirdUserName": "Ann"}
        assert await _post(http, url, {**body, "thirdUserToken": "not-a-token"}) == 401

        # A token the gateway issued for this user passes the same way (the control).
        async with http.post(stack.gateway.replace("localhost", "127.0.0.1") + "/gateway/token",
                             json={"userId": "user-42", "userName": "Ann"},
                             headers={"Authorization": "Bearer " + stack.secrets["API_KEY"]}
                             ) as r:
            assert r.status == 200, await r.text()
            token = (await r.json())["token"]
        assert await _post(http, url, {**body, "thirdUserName": "Eve",
                                       "thirdUserToken": token}) == 401
        assert await _post(http, url, {**body, "thirdUserToken": token}) == 200
