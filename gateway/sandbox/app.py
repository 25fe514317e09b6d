"""The CEC sandbox as an aiohttp application: the CEC's ``/service-cloud/`` on a laptop.

What it serves (all under ``settings.context_path``):

- ``POST /webclient/chat_client/js/thirdPartyClient.js``: token mode, first step; the script
  continues with the page's ``thirdValidate(thirdUserData)``.
- ``POST /webclient/chat_client/js/newThirdPartyClient.js``: verifies the user (auth-v2
  signature, or the enterprise's token validation URL), sets ``ccmessaging-token`` and returns
  the widget's bootstrap script; 401 with a script that does nothing otherwise.
- co-browse stubs, the widget's static files and its WebSocket ``/webclient/ws``;
- the agent console ``/agent/`` with its WebSocket ``/agent/ws``.

The cookie carries ``Domain=<the Host this app was reached by>`` on purpose: behind the gateway
that is the CEC's host, so the gateway's Set-Cookie rewriting is exercised for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.resources
import json
import logging
import secrets
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import GatewayError
from gateway.sandbox.authv2 import AuthV2Error, AuthV2Verifier
from gateway.sandbox.chat import ChatError, ChatHub, Event, Visitor
from gateway.sandbox.settings import SandboxSettings

log = logging.getLogger("gateway.sandbox")

COOKIE_NAME = "ccmessaging-token"
JS_TYPE = "text/javascript"
_MAX_BODY = 64 * 1024
_MAX_VALIDATE_ANSWER = 64 * 1024
_MAX_WS_MESSAGE = 64 * 1024
_MAX_BEACON = 1024
_OUTBOX_SIZE = 1000
_MAX_ID_LENGTH = 128
_MAX_NAME_LENGTH = 256
_AGENT_LOGIN_TIMEOUT = 60.0
_AGENT_LOGIN_ATTEMPTS = 5
_WS_UNAUTHORIZED = 4401
_UNAUTHORIZED_JS = "/* unauthorized */\n"

SETTINGS_KEY = web.AppKey("sandbox.settings", SandboxSettings)
HUB_KEY = web.AppKey("sandbox.hub", ChatHub)
VERIFIER_KEY = web.AppKey("sandbox.verifier", AuthV2Verifier)
HTTP_KEY = web.AppKey("sandbox.http", aiohttp.ClientSession)


class _Sockets:
    """The open WebSockets, so that shutdown can close them; visitor connections by id, so
    that a page's leave beacon can close its own."""

    def __init__(self) -> None:
        self.open: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.visitors: dict[str, tuple[str, web.WebSocketResponse]] = {}


SOCKETS_KEY = web.AppKey("sandbox.sockets", _Sockets)

_STATIC_FILES = {
    "widget.js": JS_TYPE,
    "widget.css": "text/css",
    "agent.html": "text/html",
    "agent.js": JS_TYPE,
    "agent.css": "text/css",
}

_CONSOLE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; "
                "form-action 'none'")

_COBROWSE_JS = "/* CEC sandbox: co-browsing is not simulated */\nwindow.CECCobrowse = {};\n"
_COBROWSE_COMMON_JS = "/* CEC sandbox: co-browsing is not simulated */\n"


class SandboxAuthError(GatewayError):
    """The sandbox refused a user (wrong ids, bad signature, failed token validation)."""


# ---------------------------------------------------------------- helpers


def _js_literal(value: object) -> str:
    """JSON that is also safe inside an inline <script> element."""
    text = json.dumps(value, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _js_response(text: str, status: int = 200) -> web.Response:
    resp = web.Response(text=text, status=status, content_type=JS_TYPE, charset="utf-8")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _unauthorized() -> web.Response:
    return _js_response(_UNAUTHORIZED_JS, status=401)


def cookie_domain(host: str) -> str | None:
    """The Host header without its port; None for IPv6 literals (no Domain= form for them)."""
    host = host.strip()
    if not host or host.startswith("["):
        return None
    return host.rsplit(":", 1)[0] if ":" in host else host


async def _json_body(request: web.Request) -> dict[str, Any]:
    # The vendor's page posts JSON text with whatever Content-Type jQuery/axios pick: ignore it.
    raw = await request.read()
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SandboxAuthError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise SandboxAuthError("the body is not a JSON object")
    return body


def _check_channel(settings: SandboxSettings, body: dict[str, Any]) -> None:
    if body.get("tenantSpaceId") != settings.tenant_space_id:
        raise SandboxAuthError("unknown tenantSpaceId")
    if body.get("channelConfigId") != settings.channel_config_id:
        raise SandboxAuthError("unknown channelConfigId")


def _visitor_from(body: dict[str, Any], mode: str) -> Visitor:
    user_id = body.get("thirdUserId")
    user_name = body.get("thirdUserName")
    if not isinstance(user_id, str) or not 0 < len(user_id) <= _MAX_ID_LENGTH:
        raise SandboxAuthError("thirdUserId is missing or too long")
    if not isinstance(user_name, str) or len(user_name) > _MAX_NAME_LENGTH:
        raise SandboxAuthError("thirdUserName is missing or too long")
    locale = body.get("locale")
    return Visitor(user_id=user_id, user_name=user_name or user_id,
                   locale=locale if locale in ("zh", "en") else "zh",
                   mode="token" if mode == "token" else "authorization")


# ---------------------------------------------------------------- scripts


def third_party_client_js() -> str:
    """What ``thirdPartyClient.js`` answers: continue with the page's ``thirdValidate``."""
    return """/* CEC sandbox: thirdPartyClient.js */
(function () {
  "use strict";
  var data = {};
  var page = null;
  try { page = thirdUserData; } catch (e) { page = null; }
  if (page && typeof page === "object") {
    for (var k in page) {
      if (Object.prototype.hasOwnProperty.call(page, k)) { data[k] = page[k]; }
    }
  }
  /* The globals the page defines before running this script win over thirdUserData. */
  try { if (typeof token !== "undefined") { data.thirdUserToken = token; } } catch (e) {}
  try { if (typeof userName !== "undefined") { data.thirdUserName = userName; } } catch (e) {}
  try { if (typeof userId !== "undefined") { data.thirdUserId = userId; } } catch (e) {}
  try { if (typeof tenantSpaceId !== "undefined") { data.tenantSpaceId = tenantSpaceId; } }
  catch (e) {}
  try { if (typeof configId !== "undefined") { data.channelConfigId = configId; } } catch (e) {}
  try { if (typeof locale !== "undefined") { data.locale = locale; } } catch (e) {}
  if (typeof thirdValidate === "function") {
    thirdValidate(data);
  } else {
    console.warn("CEC sandbox: the page defines no thirdValidate(thirdUserData)");
  }
})();
"""


def bootstrap_js(context_path: str, locale: str) -> str:
    """What ``newThirdPartyClient.js`` answers on success: load the widget and connect."""
    cfg = _js_literal({"contextPath": context_path, "locale": locale})
    return f"""/* CEC sandbox: newThirdPartyClient.js */
(function () {{
  "use strict";
  var cfg = {cfg};
  var ctx = null;
  try {{ if (typeof $aicc_ContextPath === "string" && $aicc_ContextPath) {{
    ctx = $aicc_ContextPath; }} }} catch (e) {{}}
  try {{ if (!ctx && typeof $ContextPath === "string" && $ContextPath) {{
    ctx = $ContextPath; }} }} catch (e) {{}}
  var base;
  try {{ base = new URL(ctx || cfg.contextPath, window.location.href).href; }}
  catch (e) {{ base = new URL(cfg.contextPath, window.location.href).href; }}
  cfg.base = base.replace(/\\/+$/, "");
  window.__cecSandboxConfig = cfg;
  if (window.__cecSandboxWidget) {{ window.__cecSandboxWidget.configure(cfg); return; }}
  var head = document.head || document.getElementsByTagName("body")[0];
  if (!document.getElementById("cec-widget-css")) {{
    var link = document.createElement("link");
    link.id = "cec-widget-css";
    link.rel = "stylesheet";
    link.href = cfg.base + "/webclient/chat_client/widget/widget.css";
    head.appendChild(link);
  }}
  if (!document.getElementById("cec-widget-js")) {{
    var script = document.createElement("script");
    script.id = "cec-widget-js";
    script.src = cfg.base + "/webclient/chat_client/widget/widget.js";
    script.async = true;
    head.appendChild(script);
  }}
}})();
"""


# ---------------------------------------------------------------- auth handlers


async def _validate_token(app: web.Application, body: dict[str, Any]) -> bool:
    """Call the enterprise back as the CEC does; only ``retCode`` 0 is success."""
    settings = app[SETTINGS_KEY]
    if not settings.validate_url:
        log.warning("token mode refused: no validate_url is configured")
        return False
    payload = {
        "Token": body.get("thirdUserToken"),
        "userName": body.get("thirdUserName"),
        "userId": body.get("thirdUserId"),
        "tenantSpaceId": body.get("tenantSpaceId"),
    }
    timeout = aiohttp.ClientTimeout(total=settings.validate_timeout)
    try:
        async with app[HTTP_KEY].post(settings.validate_url, json=payload,
                                      timeout=timeout) as resp:
            raw = await resp.content.read(_MAX_VALIDATE_ANSWER + 1)
            if resp.status != 200 or len(raw) > _MAX_VALIDATE_ANSWER:
                log.info("token validation answered HTTP %s", resp.status)
                return False
        answer = json.loads(raw.decode("utf-8"))
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError, ValueError) as exc:
        log.warning("token validation failed: %s", type(exc).__name__)
        return False
    ok = isinstance(answer, dict) and answer.get("retCode") in (0, "0")
    if not ok:
        log.info("token validation refused the user")
    return ok


async def third_party_client(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    try:
        body = await _json_body(request)
        _check_channel(settings, body)
    except SandboxAuthError as exc:
        log.info("thirdPartyClient.js refused: %s", exc)
        return _unauthorized()
    return _js_response(third_party_client_js())


async def new_third_party_client(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS_KEY]
    try:
        body = await _json_body(request)
        _check_channel(settings, body)
        if "thirdPartAuthorization" in body:
            mode = "authorization"
            verifier = app.get(VERIFIER_KEY)
            if verifier is None:
                raise SandboxAuthError("authorization mode needs a secret_key")
            authorization = body["thirdPartAuthorization"]
            if not isinstance(authorization, str):
                raise SandboxAuthError("thirdPartAuthorization is not a string")
            verifier.verify(authorization, method=request.method, uri=request.path, body=body)
        elif "thirdUserToken" in body:
            mode = "token"
            if not isinstance(body["thirdUserToken"], str) or not body["thirdUserToken"]:
                raise SandboxAuthError("thirdUserToken is empty")
            if not await _validate_token(app, body):
                raise SandboxAuthError("the enterprise did not validate the token")
        else:
            raise SandboxAuthError("neither thirdPartAuthorization nor thirdUserToken")
        visitor = _visitor_from(body, mode)
    except (SandboxAuthError, AuthV2Error) as exc:
        log.info("newThirdPartyClient.js refused: %s", exc)
        return _unauthorized()
    token = app[HUB_KEY].register_visitor(visitor)
    resp = _js_response(bootstrap_js(settings.context_path, visitor.locale))
    resp.set_cookie(COOKIE_NAME, token, domain=cookie_domain(request.host),
                    path=settings.context_path, httponly=True,
                    secure=True if request.secure else None)
    log.info("user accepted (%s mode)", mode)
    return resp


# ---------------------------------------------------------------- websockets


class _Outbox:
    """Ordered, non-blocking delivery of hub events to one WebSocket."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=_OUTBOX_SIZE)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def push(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            # A client that reads nothing must not make the sandbox buffer without bound.
            log.warning("a WebSocket client is too slow; closing it")
            self._task.cancel()
            asyncio.get_running_loop().create_task(self._ws.close(code=1008))

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            try:
                await self._ws.send_str(json.dumps(event, ensure_ascii=False))
            except (ConnectionError, RuntimeError):
                return

    async def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _open_ws(request: web.Request, heartbeat: float = 30.0) -> web.WebSocketResponse:
    # heartbeat: a ping every so often; no pong within half of it closes the connection.
    ws = web.WebSocketResponse(heartbeat=heartbeat, max_msg_size=_MAX_WS_MESSAGE)
    await ws.prepare(request)
    request.app[SOCKETS_KEY].open.add(ws)
    return ws


async def _messages(ws: web.WebSocketResponse, push: Callable[[Event], None],
                    ) -> AsyncGenerator[dict[str, Any], None]:
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        try:
            data = json.loads(msg.data)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            push({"type": "error", "message": "send JSON objects"})
            continue
        yield data


async def visitor_ws(request: web.Request) -> web.WebSocketResponse:
    hub = request.app[HUB_KEY]
    token = request.cookies.get(COOKIE_NAME)
    visitor = hub.lookup_visitor(token) if token else None
    ws = await _open_ws(request, request.app[SETTINGS_KEY].visitor_heartbeat)
    if visitor is None:
        # Upgrade, then close with a code: a browser cannot read an HTTP status from a
        # failed handshake, and the widget must know not to reconnect.
        await ws.close(code=_WS_UNAUTHORIZED, message=b"unauthorized")
        return ws
    outbox = _Outbox(ws)
    # This connection's id: the page's leave beacon names it (an id another site cannot
    # know, so a cross-site POST carrying the visitor's cookie cannot end their chat).
    connection = secrets.token_urlsafe(18)
    sockets = request.app[SOCKETS_KEY].visitors
    sockets[connection] = (visitor.user_id, ws)
    try:
        hub.attach_visitor(visitor, outbox.push)
        outbox.push({"type": "connection", "id": connection})
        async for data in _messages(ws, outbox.push):
            kind = data.get("type")
            try:
                if kind == "message":
                    hub.visitor_message(visitor, data.get("text"))
                elif kind == "end":
                    hub.visitor_end(visitor)
                elif kind == "rate":
                    hub.visitor_rate(visitor, data.get("stars"), data.get("comment"))
                elif kind == "start":
                    hub.visitor_start(visitor)
                elif kind == "ping":
                    outbox.push({"type": "pong"})
                else:
                    raise ChatError("unknown message type")
            except ChatError as exc:
                outbox.push({"type": "error", "message": str(exc)})
    finally:
        sockets.pop(connection, None)
        hub.detach_visitor(visitor, outbox.push)
        await outbox.close()
    return ws


async def visitor_leave(request: web.Request) -> web.Response:
    """``navigator.sendBeacon`` from the widget on ``pagehide``: close that page's connection
    now rather than when its heartbeat times out; the chat then waits
    ``visitor_gone_timeout`` for the visitor to come back (a reload, another page)."""
    token = request.cookies.get(COOKIE_NAME)
    visitor = request.app[HUB_KEY].lookup_visitor(token) if token else None
    raw = await request.content.read(_MAX_BEACON)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    connection = data.get("connection") if isinstance(data, dict) else None
    found = request.app[SOCKETS_KEY].visitors.get(connection) \
        if isinstance(connection, str) else None
    if visitor is not None and found is not None and found[0] == visitor.user_id:
        await found[1].close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"page left")
    # The same answer whatever was found: a beacon cannot read it anyway, and nobody learns
    # which connection ids exist.
    return web.Response(status=204)


async def _agent_login(ws: web.WebSocketResponse, hub: ChatHub,
                       push: Callable[[Event], None]) -> str | None:
    """Wait for ``{"type": "login", "id", "password"}``; the agent id or None."""
    attempts = 0
    async with contextlib.aclosing(_messages(ws, push)) as messages:
        async for data in messages:
            if data.get("type") != "login":
                push({"type": "error", "message": "sign in first"})
                continue
            account = hub.authenticate_agent(data.get("id"), data.get("password"))
            if account is not None:
                return account.id
            attempts += 1
            await asyncio.sleep(0.2)  # slows password guessing a little; enough for a sandbox
            push({"type": "login_failed", "message": "wrong agent id or password"})
            if attempts >= _AGENT_LOGIN_ATTEMPTS:
                break
    return None


async def agent_ws(request: web.Request) -> web.WebSocketResponse:
    hub = request.app[HUB_KEY]
    ws = await _open_ws(request)
    outbox = _Outbox(ws)
    agent_id: str | None = None
    try:
        try:
            agent_id = await asyncio.wait_for(_agent_login(ws, hub, outbox.push),
                                              _AGENT_LOGIN_TIMEOUT)
        except TimeoutError:
            agent_id = None
        if agent_id is None:
            await ws.close(code=_WS_UNAUTHORIZED, message=b"unauthorized")
            return ws
        hub.attach_agent(agent_id, outbox.push)
        async for data in _messages(ws, outbox.push):
            kind = data.get("type")
            try:
                if kind == "status":
                    hub.set_agent_status(agent_id, data.get("status"))
                elif kind == "message":
                    hub.agent_message(agent_id, data.get("chat"), data.get("text"))
                elif kind == "end":
                    hub.agent_end(agent_id, data.get("chat"))
                elif kind == "ping":
                    outbox.push({"type": "pong"})
                else:
                    raise ChatError("unknown message type")
            except ChatError as exc:
                outbox.push({"type": "error", "message": str(exc)})
    finally:
        if agent_id is not None:
            hub.detach_agent(agent_id, outbox.push)
        await outbox.close()
    return ws


# ---------------------------------------------------------------- static and stubs


def _load_static() -> dict[str, bytes]:
    folder = importlib.resources.files("gateway.sandbox").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in _STATIC_FILES}


def _static_handler(body: bytes, content_type: str, *, console: bool = False,
                    ) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        resp = web.Response(body=body, content_type=content_type, charset="utf-8")
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        if console:
            resp.headers["Content-Security-Policy"] = _CONSOLE_CSP
            resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    return handler


def _text_handler(text: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return _js_response(text)

    return handler


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


# ---------------------------------------------------------------- application


def create_sandbox_app(settings: SandboxSettings, *,
                       clock: Callable[[], float] = time.time,
                       wall_clock: Callable[[], dt.datetime] | None = None) -> web.Application:
    """The sandbox application. ``clock`` (POSIX seconds) feeds the signature check and
    ``wall_clock`` the working hours; tests replace them."""
    app = web.Application(client_max_size=_MAX_BODY)
    app[SETTINGS_KEY] = settings
    hub_kwargs: dict[str, Any] = {}
    if wall_clock is not None:
        hub_kwargs["wall_clock"] = wall_clock
    app[HUB_KEY] = ChatHub(settings, **hub_kwargs)
    app[SOCKETS_KEY] = _Sockets()
    if settings.secret_key is not None:
        app[VERIFIER_KEY] = AuthV2Verifier(
            access_key=settings.effective_access_key, secret_key=settings.secret_key,
            clock_skew=settings.clock_skew, replay_window=settings.replay_window,
            signed_headers=settings.signed_headers, content_type=settings.content_type,
            payload_fields=settings.payload_fields, clock=clock)
    else:
        log.warning("sandbox has no secret_key: authorization mode will refuse everybody")

    app.cleanup_ctx.append(_http_client)
    app.on_shutdown.append(_close_sockets)

    cp = settings.context_path
    js = f"{cp}/webclient/chat_client/js"
    static = _load_static()
    r = app.router
    r.add_post(f"{js}/thirdPartyClient.js", third_party_client)
    r.add_post(f"{js}/newThirdPartyClient.js", new_third_party_client)
    r.add_get(f"{js}/cobrowseCommon.js", _text_handler(_COBROWSE_COMMON_JS))
    r.add_get(f"{cp}/resource.root/cobrowse/sdk/cobrowse.js", _text_handler(_COBROWSE_JS))
    for name in ("widget.js", "widget.css"):
        r.add_get(f"{cp}/webclient/chat_client/widget/{name}",
                  _static_handler(static[name], _STATIC_FILES[name]))
    r.add_get(f"{cp}/webclient/ws", visitor_ws)
    r.add_post(f"{cp}/webclient/leave", visitor_leave)
    r.add_get(f"{cp}/agent", _redirect(f"{cp}/agent/"))
    r.add_get(f"{cp}/agent/", _static_handler(static["agent.html"], "text/html", console=True))
    for name in ("agent.js", "agent.css"):
        r.add_get(f"{cp}/agent/{name}", _static_handler(static[name], _STATIC_FILES[name]))
    r.add_get(f"{cp}/agent/ws", agent_ws)
    r.add_get(f"{cp}/health", _health)
    return app


def _redirect(location: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPFound(location)

    return handler


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession() as session:
        app[HTTP_KEY] = session
        yield
    await app[HUB_KEY].close()


async def _close_sockets(app: web.Application) -> None:
    # Open WebSockets would otherwise hold the shutdown for its whole timeout.
    for ws in list(app[SOCKETS_KEY].open):
        with contextlib.suppress(Exception):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"sandbox stopping")


async def start_sandbox(settings: SandboxSettings, *, host: str | None = None,
                        port: int | None = None) -> web.AppRunner:
    """Start listening (``settings.host:port`` unless overridden; port 0 picks one).

    The caller owns the runner: ``await runner.cleanup()`` stops it. See :func:`runner_url`.
    """
    runner = web.AppRunner(create_sandbox_app(settings), handle_signals=False,
                           shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host or settings.host,
                       settings.port if port is None else port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def runner_url(runner: web.AppRunner, settings: SandboxSettings) -> str:
    """``http://host:port{context_path}`` of a started runner (the first bound address)."""
    host, port = runner.addresses[0][:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{settings.context_path}"


async def run_sandbox(settings: SandboxSettings) -> None:
    """Serve until cancelled (``gateway sandbox``); cleans up on the way out."""
    runner = await start_sandbox(settings)
    try:
        url = runner_url(runner, settings)
        log.info("CEC sandbox at %s/ (agent console %s/agent/)", url, url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
