"""End-to-end fixtures: the real gateway on real sockets, with stand-ins for its neighbours.

- ``cec``: the recording upstream (tests/support/upstreams.py) standing in for the CEC; it
  answers the chat scripts with JavaScript showing the body it was sent.
- ``site``: a tiny enterprise site; ``GET /api/me`` answers ``{"userId","userName"}`` for a
  known ``sid=`` session cookie and 401 otherwise; other paths answer a small HTML page.
- ``redis``: a real redis-server on a free loopback port (``tests/redis_server.py``).
- ``start_gateway``: ``await start_gateway(yaml_text)`` serves a gateway in this event loop
  (``gateway.runtime.serving``) until the test ends.
- ``browser``: ``browser()`` gives a new aiohttp ClientSession with its own cookie jar: one
  browser. ``browser(local_addr=...)`` connects from another loopback address.

Test modules import the pure helpers below (the independent auth-v2 verifier, config text
builders, constants) as ``tests.integration.conftest``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from gateway.runtime import Running  # noqa: E402
from tests.redis_server import RedisServer, redis_or_fail  # noqa: E402
from tests.support.gateway import GatewayStarter  # noqa: E402
from tests.support.upstreams import RawRecorder, UpConn, UpRequest, run_recorder, serve  # noqa: E402

# A known secret, 43 characters of [A-Za-z0-9]: tests search for these bytes in everything.
SECRET = "KnownSecretValueForTests0123456789abcdefXYZ"
SPEC_SECRET = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f"
TENANT = "202007159031"
CHANNEL = "202011230001"
TOKEN_KEY = "token-signing-key-0123456789abcdef"
API_KEY = "api-key-0123456789abcdef-integration"
CONTEXT = "/service-cloud"
NEW_CLIENT = CONTEXT + "/webclient/chat_client/js/newThirdPartyClient.js"
CLIENT = CONTEXT + "/webclient/chat_client/js/thirdPartyClient.js"
VALIDATE = "/rest/cc-messaging/v1/thirdparty/chatThirdPartyValidate"
GUEST_ID_RE = re.compile(r"^guest-[0-9a-f]{20}$")
TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


# ------------------------------------------------------------------ independent auth-v2


def spec_normalize(text: str) -> str:
    """SPEC.md: UTF-8 bytes; A-Z a-z 0-9 - . _ ~ stay, every other byte becomes %XX."""
    keep = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
    return "".join(chr(b) if b in keep else f"%{b:02X}" for b in text.encode("utf-8"))


def spec_sign(secret: str, access_key: str, timestamp: str, payload: str, *,
              method: str = "POST", uri: str = NEW_CLIENT) -> str:
    """auth-v2 as SPEC.md reads it, with the default signed headers; written from the spec."""
    body = payload.encode("utf-8")
    headers = {"content-length": str(len(body)), "content-type": "application/json;charset=UTF-8"}
    signed = ";".join(sorted(headers))
    prefix = f"auth-v2/{access_key}/{timestamp}/{signed}"
    signing_key = hmac.new(secret.encode(), prefix.encode(), hashlib.sha256).hexdigest()
    canonical_headers = "\n".join(sorted(
        spec_normalize(k) + ":" + spec_normalize(v.strip()) for k, v in headers.items()))
    parts = [method, uri, signed, canonical_headers]
    if payload:
        parts.append(spec_normalize(payload))
    canonical = "\n".join(parts)
    sig = hmac.new(signing_key.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    return f"{prefix}/{sig}"


def spec_payload(user_name: str, user_id: str, tenant: str = TENANT,
                 channel: str = CHANNEL) -> str:
    """The signed payload: compact JSON of the four fields in SPEC order, non-ASCII kept."""
    return json.dumps({"thirdUserName": user_name, "thirdUserId": user_id,
                       "tenantSpaceId": tenant, "channelConfigId": channel},
                      ensure_ascii=False, separators=(",", ":"))


def verify_authorization(auth: str, user_name: str, user_id: str, *, secret: str = SECRET,
                         tenant: str = TENANT, channel: str = CHANNEL) -> bool:
    """Does ``auth`` sign exactly these identity values (with the timestamp it carries)?"""
    parts = auth.split("/")
    if len(parts) != 5 or parts[0] != "auth-v2":
        return False
    timestamp = parts[2]
    expected = spec_sign(secret, channel, timestamp,
                         spec_payload(user_name, user_id, tenant, channel))
    return hmac.compare_digest(auth, expected)


# ------------------------------------------------------------------ the CEC stand-in


async def _cec_answer(req: UpRequest, conn: UpConn, writer: asyncio.StreamWriter) -> bool:
    # The real CEC answers script text; this one shows what it was sent, as a JS string.
    if req.path.endswith(".js"):
        text = "window.__cecReceived = " + json.dumps(req.body.decode("utf-8", "replace")) + ";\n"
        body, ctype = text.encode(), b"application/javascript; charset=utf-8"
    else:
        body, ctype = json.dumps({"path": req.path}).encode(), b"application/json; charset=utf-8"
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nContent-Length: %d\r\n\r\n%b"
                 % (ctype, len(body), b"" if req.method == "HEAD" else body))
    await writer.drain()
    return True


# ------------------------------------------------------------------ the enterprise site


@dataclass
class Site:
    url: str
    sessions: dict[str, tuple[str, str]] = field(default_factory=dict)
    me_calls: list[str] = field(default_factory=list)  # Cookie headers /api/me received


async def _site_handler(site: Site, request: web.BaseRequest) -> web.StreamResponse:
    if request.path == "/api/me":
        site.me_calls.append(request.headers.get("Cookie", ""))
        found = site.sessions.get(request.cookies.get("sid", ""))
        if found is None:
            return web.json_response({"error": "not logged in"}, status=401)
        return web.json_response({"userId": found[0], "userName": found[1]})
    return web.Response(text=f"<p>site page {request.path}</p>", content_type="text/html")


@pytest.fixture
async def cec() -> AsyncIterator[RawRecorder]:
    async with run_recorder(_cec_answer) as up:
        yield up


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    s = Site("")
    async with serve(lambda r: _site_handler(s, r)) as port:
        s.url = f"http://127.0.0.1:{port}"
        yield s


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port, stopped after the test."""
    with redis_or_fail() as server:
        yield server


# ------------------------------------------------------------------ configurations


def guest_config(cec: RawRecorder, site: Site, *, extra: str = "", cec_extra: str = "",
                 port: int = 0) -> str:
    """Authorization (guest) mode: /service-cloud/ to the CEC stand-in, / to the site."""
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
timeouts: {{shutdown_grace: 1s, connect: 2s, read: 5s}}
routes:
  - prefix: {CONTEXT}/
    upstream: {cec.url}{CONTEXT}/
  - prefix: /
    upstream: {site.url}/
cec:
  tenant_space_id: "{TENANT}"
  channel_config_id: "{CHANNEL}"
  locale: en
  context_path: {CONTEXT}
  auth:
    mode: authorization
    secret_key: ${{CEC_SECRET_KEY}}
{cec_extra}
{extra}
"""


def token_config(cec: RawRecorder | str, site: Site, *, store: str = "memory",
                 fallback: bool = False,
                 guard: str = "{max_failures: 50, window: 1m, lockout: 30s}",
                 allow_from: str = "[127.0.0.1/32]", trusted: str = "[]", port: int = 0,
                 identity_source: str = "url", workers: bool = False) -> str:
    """Token mode, identity from the site's /api/me (called directly, with the visitor's cookie);
    ``cec``: the CEC stand-in or its base URL."""
    cec_url = cec if isinstance(cec, str) else cec.url
    identity = (f"{{source: url, url: {{url: '{site.url}/api/me', cache_ttl: 0}}"
                f"{', fallback: guest' if fallback else ''}}}"
                if identity_source == "url" else "{source: guest}")
    return f"""
listen: {{host: 127.0.0.1, port: {port}{', workers: 1' if workers else ''}}}
trusted_proxies: {trusted}
timeouts: {{shutdown_grace: 1s, connect: 2s, read: 5s}}
routes:
  - prefix: {CONTEXT}/
    upstream: {cec_url}{CONTEXT}/
  - prefix: /
    upstream: {site.url}/
cec:
  tenant_space_id: "{TENANT}"
  channel_config_id: "{CHANNEL}"
  context_path: {CONTEXT}
  auth: {{mode: token}}
  identity: {identity}
  guest: {{cookie_key: "guest-cookie-key-0123456789abcdef"}}
token:
  signing_key: {TOKEN_KEY}
  api_key: {API_KEY}
  ttl: 10m
  store: {store}
  validate_path: {VALIDATE}
  validate_allow_from: {allow_from}
  guard: {guard}
  rate_limit: 1000/second
"""


@pytest.fixture
def start_gateway(start_gateway: GatewayStarter) -> GatewayStarter:
    """``running = await start_gateway(yaml_text, env={...})``: the shared starter
    (tests/support/gateway.py) with the known CEC secret in the environment."""
    async def start(yaml_text: str, env: dict[str, str] | None = None) -> Running:
        return await start_gateway(yaml_text, {"CEC_SECRET_KEY": SECRET, **(env or {})})

    return start


BrowserFactory = Callable[..., aiohttp.ClientSession]


@pytest.fixture
async def browser() -> AsyncIterator[BrowserFactory]:
    """``browser()`` → a ClientSession with its own cookie jar (one browser); closed at the end."""
    made: list[aiohttp.ClientSession] = []

    def make(local_addr: tuple[str, int] | None = None) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(local_addr=local_addr, force_close=True)
        # unsafe=True: the gateway is addressed by IP (127.0.0.1), which a strict jar ignores.
        session = aiohttp.ClientSession(connector=connector,
                                        cookie_jar=aiohttp.CookieJar(unsafe=True))
        made.append(session)
        return session

    yield make
    for session in made:
        await session.close()


def third_user_data(**fields: Any) -> dict[str, Any]:
    """A page's thirdUserData, as the vendor's demo builds it; keyword arguments override."""
    data: dict[str, Any] = {
        "thirdUserName": "Tom",
        "thirdUserId": "10010001",
        "tenantSpaceId": TENANT,
        "channelConfigId": CHANNEL,
        "locale": "en",
        "timestamp": 1700000000000,
        "mapService": "tencent",
    }
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


def guest_id_of(session: aiohttp.ClientSession, cookie_name: str = "cec_guest") -> str | None:
    """The guest id inside the session's guest cookie (itsdangerous: ``<id>.<signature>``)."""
    for morsel in session.cookie_jar:
        if morsel.key == cookie_name:
            return morsel.value.rsplit(".", 1)[0]
    return None
