"""End-to-end fixtures: the sandbox, the sample site and the gateway in-process, and Chromium.

Everything listens on 127.0.0.1 (free ports), but the browser reaches the gateway as
``http://localhost:<port>``: the gateway's origin then differs from the sandbox's host
(``127.0.0.1``), so a ``ccmessaging-token`` cookie that kept the sandbox's ``Domain=127.0.0.1``
would be refused by the browser. Only the gateway's Set-Cookie rewriting can make it land.

The browser is Debian's Chromium (``/usr/bin/chromium``) driven by Playwright; no browser is
ever downloaded. Without it the e2e tests are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from gateway.config import Config, load_config_text
from gateway.demo.site import SiteSettings, start_site
from gateway.runtime import serving
from gateway.sandbox.app import start_sandbox
from gateway.sandbox.settings import SandboxSettings
from tests.support.ports import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
TENANT = "202007159031"
CHANNEL = "202011230001"
# The README's screenshots are refreshed only when asked (GATEWAY_SCREENSHOTS=docs, or any
# folder): a test run must leave the checkout as it found it.
SCREENSHOTS_ENV = "GATEWAY_SCREENSHOTS"
XSS_NAME = '"</script><img src=x onerror=alert(1)>'

# Runs before any page script: records alert() calls and any <img> that appears.
ALERT_HOOK = """
(() => {
  window.__alerts = [];
  window.alert = function (m) { window.__alerts.push(String(m)); };
  window.__imgs = 0;
  new MutationObserver(function (records) {
    records.forEach(function (r) {
      r.addedNodes.forEach(function (n) {
        if (n.nodeType === 1 &&
            (n.tagName === "IMG" || (n.querySelector && n.querySelector("img")))) {
          window.__imgs += 1;
        }
      });
    });
  }).observe(document, { childList: true, subtree: true });
})();
"""


def random_cec_secret() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(43))


def _port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


@dataclass
class Stack:
    """One running sandbox + site + gateway (+ two extra origins for CORS)."""

    mode: str
    config: Config
    gateway_port: int
    sandbox_port: int
    site_port: int
    allowed_origin: str
    denied_origin: str
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        """The gateway as the browser sees it (host ``localhost``)."""
        return f"http://localhost:{self.gateway_port}"

    @property
    def sandbox(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}/service-cloud"

    @property
    def agent_console(self) -> str:
        return f"{self.gateway}/service-cloud/agent/"


CONFIG = """
listen: {host: 127.0.0.1, port: "${GW_PORT}"}
trusted_proxies: [127.0.0.1/32]
access_log: false
timeouts: {shutdown_grace: 2s}
routes:
  - prefix: /service-cloud/
    upstream: http://127.0.0.1:${SB_PORT}/service-cloud/
    preserve_host: false
  - prefix: /
    upstream: http://127.0.0.1:${SITE_PORT}/
    preserve_host: true
cors:
  allow_origins: ["${ALLOWED_ORIGIN}"]
  allow_credentials: true
cec:
  tenant_space_id: "202007159031"
  channel_config_id: "202011230001"
  locale: en
  auth: {mode: "${MODE}", secret_key: "${CEC_SECRET_KEY}"}
  identity:
    source: url
    url: {url: "http://127.0.0.1:${SITE_PORT}/api/me", cache_ttl: 0}
    fallback: guest
token:
  signing_key: "${TOKEN_KEY}"
  api_key: "${API_KEY}"
  validate_allow_from: [127.0.0.1/32]
"""


async def _blank(request: web.Request) -> web.Response:
    return web.Response(text="<!DOCTYPE html><title>other origin</title>"
                        '<link rel="icon" href="data:,"><p>other origin</p>',
                        content_type="text/html")


async def _start_blank() -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/", _blank)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@contextlib.asynccontextmanager
async def run_stack(mode: str, **sandbox_settings: Any) -> AsyncIterator[Stack]:
    """The stack; ``sandbox_settings`` override the sandbox's (agents, timeouts...)."""
    values = {
        "CEC_SECRET_KEY": random_cec_secret(),
        "TOKEN_KEY": secrets.token_hex(32),
        "API_KEY": secrets.token_hex(32),
    }
    gw_port = free_port()
    runners: list[web.AppRunner] = []
    try:
        sandbox = SandboxSettings(
            port=0, secret_key=SecretStr(values["CEC_SECRET_KEY"]),
            validate_url=(f"http://127.0.0.1:{gw_port}"
                          "/rest/cc-messaging/v1/thirdparty/chatThirdPartyValidate"),
            **sandbox_settings)
        runners.append(await start_sandbox(sandbox, host="127.0.0.1", port=0))
        runners.append(await start_site(SiteSettings(tenant_space_id=TENANT,
                                                     channel_config_id=CHANNEL)))
        runners.append(await _start_blank())
        runners.append(await _start_blank())
        sb_port, site_port, allowed_port, denied_port = (_port(r) for r in runners)
        allowed = f"http://127.0.0.1:{allowed_port}"
        env = {**values, "GW_PORT": str(gw_port), "SB_PORT": str(sb_port),
               "SITE_PORT": str(site_port), "ALLOWED_ORIGIN": allowed, "MODE": mode}
        config = load_config_text(CONFIG, env=env)
        async with serving(config):
            yield Stack(mode, config, gw_port, sb_port, site_port, allowed,
                        f"http://127.0.0.1:{denied_port}", secrets=values)
    finally:
        for runner in runners:
            await runner.cleanup()


def _have_chromium() -> bool:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        return False
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not _have_chromium():
        # `./dev test` (and so CI) installs Chromium and sets this: there, missing is a failure.
        if os.environ.get("GATEWAY_REQUIRE_BROWSER"):
            pytest.fail("Chromium or playwright is missing but GATEWAY_REQUIRE_BROWSER is set")
        pytest.skip("needs /usr/bin/chromium and playwright")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            yield b
        finally:
            await b.close()


@dataclass
class Watch:
    """What a browser context received and complained about."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)
    pending: list[asyncio.Task[None]] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("response", self._response)
        page.on("websocket", self._websocket)

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            self.console_errors.append(msg.text)

    def _response(self, response: Any) -> None:
        async def grab() -> None:
            with contextlib.suppress(Exception):  # redirects and aborted loads have no body
                self.bodies.append((response.url, await response.body()))

        self.pending.append(asyncio.ensure_future(grab()))

    def _websocket(self, ws: Any) -> None:
        def frame(payload: Any) -> None:
            self.frames.append(payload if isinstance(payload, str) else repr(payload))

        ws.on("framereceived", frame)

    async def settle(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)

    async def assert_no_secret(self, *values: str) -> None:
        await self.settle()
        # The bodies that matter were really recorded (the check below is not vacuous).
        assert any("/gateway/chat.js" in url or "newThirdPartyClient.js" in url
                   or "/agent/" in url for url, _ in self.bodies), [u for u, _ in self.bodies]
        for url, body in self.bodies:
            for value in values:
                assert value.encode() not in body, f"a secret reached the browser in {url}"
        for frame in self.frames:
            for value in values:
                assert value not in frame, "a secret reached the browser in a WebSocket frame"


Opener = Callable[[], Awaitable[tuple[Any, Any, Watch]]]


@pytest.fixture
def open_page(browser: Any) -> Callable[..., Awaitable[tuple[Any, Any, Watch]]]:
    """``context, page, watch = await open_page()``: a fresh context with the hooks on."""

    async def open_(**kwargs: Any) -> tuple[Any, Any, Watch]:
        context = await browser.new_context(viewport={"width": 1100, "height": 760}, **kwargs)
        context.set_default_timeout(10_000)
        await context.add_init_script(ALERT_HOOK)
        page = await context.new_page()
        watch = Watch()
        watch.attach(page)
        return context, page, watch

    return open_
