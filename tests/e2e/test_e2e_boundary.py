"""The trust boundary in headless Chromium: what a real browser keeps, sends and follows.

A hostile CEC (tests/test_boundary.py's scripted upstream) tries to overwrite the gateway's
guest cookie and the site's session cookie; a site redirect uses the tab trick that turned
into an open redirect. And Chromium's own URL parser judges the gateway's redirect rewriting
(and the independent resolver tests/test_boundary_redirects.py uses) over generated values.
"""

from __future__ import annotations

import random
from typing import Any
from urllib.parse import quote

import pytest

from gateway.boundary import rewrite_location
from tests.test_boundary import stack
from tests.test_boundary_redirects import (
    DEFAULT_PORT,
    GATEWAY,
    ROUTES,
    Resolved,
    resolve,
)

pytest.importorskip("playwright.async_api")


async def test_the_guest_cookie_survives_a_hostile_cec_set_cookie(open_page: Any) -> None:
    async with stack() as gw:
        origin = f"http://localhost:{gw.port}"
        context, page, _ = await open_page()
        try:
            await context.add_cookies([{"name": "SESSION", "value": "site-session",
                                        "url": origin + "/"}])
            await page.goto(origin + "/chat/")  # the gateway issues the guest cookie
            before = {c["name"]: c for c in await context.cookies()}
            guest = before["cec_guest"]["value"]
            assert guest
            await page.goto(origin + "/service-cloud/set-cookies")
            after = await context.cookies()
            by_name = {c["name"]: c for c in after}
            # The gateway's guest cookie and the site's session: untouched.
            assert by_name["cec_guest"]["value"] == guest
            assert by_name["SESSION"]["value"] == "site-session"
            assert [c["name"] for c in after].count("cec_guest") == 1
            assert [c["name"] for c in after].count("SESSION") == 1
            # The CEC's own cookies: on the gateway's host, inside the CEC's prefix.
            cec_cookies = {c["name"]: c for c in after
                           if c["name"] not in ("cec_guest", "SESSION")}
            assert set(cec_cookies) == {"ccmessaging-token", "__cec_JSESSIONID", "__cec_pref"}
            for cookie in cec_cookies.values():
                assert cookie["domain"] == "localhost"
                assert cookie["path"].startswith("/service-cloud")
            # What the browser then sends the CEC: its own cookies, nothing of the site's.
            await page.goto(origin + "/service-cloud/chat")
            sent = gw.cec.requests[-1]
            assert sent.target == "/service-cloud/chat"
            assert sent.header("Cookie") == "ccmessaging-token=t1; JSESSIONID=j1"
            # ... and the site still gets its session, not the CEC's cookies.
            await page.goto(origin + "/account")
            site_cookies = gw.site.requests[-1].header("Cookie") or ""
            # (By name: the guest cookie's random value may contain "t1" or "j1".)
            names = {part.split("=", 1)[0].strip() for part in site_cookies.split(";")}
            assert "SESSION=site-session" in site_cookies
            assert not names & {"ccmessaging-token", "__cec_JSESSIONID", "__cec_pref",
                                "JSESSIONID"}
        finally:
            await context.close()


async def test_the_tab_redirect_stays_on_the_gateway_in_chromium(open_page: Any) -> None:
    async with stack() as gw:
        origin = f"http://localhost:{gw.port}"
        context, page, _ = await open_page()
        try:
            to = quote("{own}/\t/evil.example/x", safe="")
            await page.goto(f"{origin}/redirect?to={to}")
            # Followed by Chromium itself: still the gateway's origin (the site answers).
            assert page.url == f"{origin}/evil.example/x"
            assert "/evil.example/x" in [r.target for r in gw.site.requests]
        finally:
            await context.close()


def _values(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    schemes = ["", "", "http:", "https:", "HTTP:", "javascript:", "ftp:"]
    slash = ["/", "\\", "\t", "\n", "/"]
    hosts = ["cec.example.com", "CEC.example.com", "cec.example.com:443", "127.0.0.1:3000",
             "127.0.0.1", GATEWAY, "origin.example:8080", "evil.example", "user@evil.example",
             "cec.example.com@evil.example", ""]
    segs = ["service-cloud", "app", "..", ".", "%2e", "%2E.", "", "evil.example", "x", "\t",
            "\\"]
    tails = ["", "?a=1", "?to=//evil.example", "#f", "?x=\\y#z"]
    out = []
    for _ in range(n):
        out.append(rnd.choice(["", "", " ", "\t"]) + rnd.choice(schemes)
                   + "".join(rnd.choice(slash) for _ in range(rnd.randint(0, 3)))
                   + rnd.choice(hosts) + rnd.choice(["/", "\\", "", "/\t/"])
                   + "/".join(rnd.choice(segs) for _ in range(rnd.randint(0, 5)))
                   + rnd.choice(tails))
    return out


_JS = """([values, base]) => values.map(v => {
  try { const u = new URL(v, base);
        return [u.protocol.slice(0, -1), u.hostname, u.port, u.pathname]; }
  catch (e) { return null; }
})"""


@pytest.mark.parametrize("https", [False, True])
async def test_chromium_goes_where_the_rewrite_says(open_page: Any, https: bool) -> None:
    context, page, _ = await open_page()
    scheme = "https" if https else "http"
    try:
        for name, urls in sorted(ROUTES.items()):
            base = f"{scheme}://{GATEWAY}{urls.prefix}page"
            values = _values(250, seed=len(name) * 2 + https)
            outs = [rewrite_location(v, urls, https) for v in values]
            before = await page.evaluate(_JS, [values, base])
            after = await page.evaluate(_JS, [outs, base])
            page_ref = Resolved(scheme, GATEWAY, DEFAULT_PORT[scheme], urls.prefix + "page",
                                False)
            for value, out, b, a in zip(values, outs, before, after, strict=True):
                if a is None or a[0] not in DEFAULT_PORT:
                    continue
                allowed = {GATEWAY} | ({b[1]} if b is not None else set())
                assert a[1] in allowed, f"{value!r} -> {out!r}: Chromium goes to {a[1]}"
                # The test's own resolver agrees with Chromium wherever Chromium resolves.
                if b is not None and b[0] in DEFAULT_PORT:
                    mine = resolve(value, page_ref)
                    assert mine is not None, value
                    port = int(b[2]) if b[2] else DEFAULT_PORT[b[0]]
                    assert (mine.scheme, mine.host, mine.port, mine.path) == (
                        b[0], b[1], port, b[3]), value
    finally:
        await context.close()


async def test_the_own_page_works_under_its_csp(open_page: Any) -> None:
    """/chat/ with its restrictive CSP: the loader runs the CEC's answer and the widget
    connects (its WebSocket too), and Chromium reports no CSP violation."""
    from playwright.async_api import expect

    from tests.e2e.conftest import run_stack

    async with run_stack("authorization") as s:
        context, page, watch = await open_page()
        try:
            violations: list[str] = []
            page.on("console", lambda m: violations.append(m.text)
                    if "Content Security Policy" in m.text else None)
            response = await page.goto(s.gateway + "/chat/")
            assert response is not None
            csp = await response.header_value("content-security-policy") or ""
            assert "frame-ancestors 'self'" in csp and "'strict-dynamic'" in csp
            await expect(page.locator("#cec-widget #cec-chat-button")).to_be_visible()
            await page.click("#cec-chat-button")
            window = page.locator("#cec-chat-window")
            await expect(window).to_be_visible()
            await expect(window).to_have_attribute("data-connected", "true")
            assert violations == []
            assert watch.page_errors == []
        finally:
            await context.close()
